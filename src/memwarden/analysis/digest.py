"""Journal records → process lifetimes, in one pass, in memory bounded by lifetimes and kinds.

:class:`Digest` takes records one at a time (``add``) and keeps, per process lifetime, a
:class:`JobSeries` (memory after each job) and a :class:`SampleSeries` (the watchdog's or
``memwarden run``'s readings), plus counts and a bounded set of markers. A series holds at
most :data:`POINTS` points: past that, neighbours merge (each point then stands for 2, 4, …
consecutive records, keeping their lowest and highest level, their job kinds' counts and
the last live-memory figure), so a lifetime of a million jobs costs what one of 4096 does.
Under :data:`BUDGET` points for all lifetimes together, the longest series merge first.

Which records make one lifetime (docs/journal.md "Records"):

- records are keyed by host and ``pid``; a pid seen again after a restart or kill (or a
  ``start`` record of ``memwarden run``) with far less memory is a new lifetime (containers
  reuse pids);
- a forking worker's jobs (RQ's work horses: ``worker_pid`` beside ``pid``) belong to the
  worker that forked them, at the level the horse started from (the parent's memory): each
  horse's own growth dies with it;
- ``memwarden run``'s samples (they carry ``supervisor``) are judged on ``total``, the
  command's own figure, never on ``rss`` (which may be the supervisor's).
"""

from __future__ import annotations

import gc
import math
from array import array
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from memwarden.analysis.read import (
    JOB_FIELDS,
    LIVE_AFTER_AT,
    LIVE_BEFORE_AT,
    ReadSummary,
    check,
    feed,
    has_live_keys,
    job_fields,
)
from memwarden.events import Cause, action_word, cause_of, cause_words

try:
    from collections import _count_elements  # type: ignore[attr-defined]  # Counter's C helper
except ImportError:  # another Python

    def _count_elements(mapping: dict[Any, int], iterable: Iterable[Any]) -> None:
        for e in iterable:
            mapping[e] = mapping.get(e, 0) + 1


from memwarden.trace import BLOCK_BYTES

#: Points per series before neighbours merge.
POINTS = 4096
#: Points of all lifetimes together before the longest series merge.
BUDGET = 1 << 18
#: Distinct job kinds told apart; later ones are pooled as :data:`OTHER`.
KIND_IDS = 4096
OTHER = "(other kinds)"
#: Chart markers (restart, kill, reclaim …) kept per lifetime; all are counted.
MARKS = 400
#: Jobs of the streamed sustained level (the lowest level over the next jobs) once a
#: series merges (a merged series has no per-job levels left to compute it from).
SUSTAIN = 20
#: Jobs of a lifetime that wait to be stored together (:meth:`JobSeries.flush`).
BATCH = 256
NAN = float("nan")

Record = dict[str, Any]


def median(xs: Iterable[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return 0.0
    mid = n // 2
    return float(s[mid]) if n % 2 else (s[mid - 1] + s[mid]) / 2.0


def _live_after(values: tuple[Any, ...], r: Any, life: Life) -> float:
    """:func:`memwarden.trace.live_bytes` after a job (NaN when not known), from the values
    of a job record's :data:`JOB_FIELDS`; counted in ``life`` as known or partial."""
    blocks, heap, mapped, allocated = values[LIVE_AFTER_AT]
    if allocated is None:
        if heap is None or mapped is None:
            if has_live_keys(r):
                life.live_partial += 1
        else:
            allocated = heap + mapped
    if allocated is None:
        return NAN
    life.live_known += 1
    return float(allocated) + BLOCK_BYTES * float(blocks or 0)


def _live_before(values: tuple[Any, ...]) -> float | None:
    """:func:`memwarden.trace.live_bytes` before a job, from the values of a job record's
    :data:`JOB_FIELDS` (inlined for speed)."""
    blocks, heap, mapped, allocated = values[LIVE_BEFORE_AT]
    if allocated is None:
        if heap is None or mapped is None:
            return None
        allocated = heap + mapped
    return float(allocated) + BLOCK_BYTES * float(blocks or 0)


def _second(_: Any, b: Any) -> Any:
    return b


@contextmanager
def _gc_paused() -> Iterator[None]:
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


# ----------------------------------------------------------------------------- series
class JobSeries:
    """Memory after each job, one point per job until :data:`POINTS`, then merged.

    Per point: ``n`` jobs, ``ts`` of the last one's end and ``start`` of the first one's
    start (``ts - duration_s``), ``lo``/``hi`` the lowest/highest level, ``top`` the kind id
    of the job at ``hi`` (of the job itself while unmerged), ``live`` the live memory after
    its last job (NaN: unknown). Once merged, each point's runs per kind are kept sparsely:
    ``(kind, runs)`` pairs in ``ck``/``cn``, point ``i``'s from ``co[i]`` to ``co[i + 1]``.

    Jobs wait in ``pend`` (``(ts, start, level, kind, live)``, at most :data:`BATCH`) and
    are stored by :meth:`flush` a batch at a time, in passes over whole columns: a job then
    costs one tuple, not a call per column (see ``bench/diagnose_scale.py``)."""

    __slots__ = (
        "ck",
        "cn",
        "co",
        "hi",
        "live",
        "lo",
        "merged",
        "n",
        "pend",
        "per",
        "start",
        "stream",
        "top",
        "ts",
    )

    def __init__(self) -> None:
        self.n = array("I")
        self.ts = array("d")
        self.start = array("d")
        self.lo = array("d")
        self.hi = array("d")
        self.top = array("i")
        self.live = array("d")
        self.merged = False
        self.ck = array("i")
        self.cn = array("I")
        self.co = array("I", [0])
        self.per = 1  # jobs per new point
        self.pend: list[tuple[float, float, float, int, float]] = []
        #: the streamed sustained level, fed as jobs are stored once merged (see Digest)
        self.stream: Streamed | None = None

    def __len__(self) -> int:
        return len(self.n) + -(-len(self.pend) // self.per)

    @property
    def exact(self) -> bool:
        return not self.merged

    def add(self, ts: float, start: float, level: float, kind: int, live: float) -> int:
        """One job; returns the change in stored points."""
        self.pend.append((ts, start, level, kind, live))
        return self.flush() if len(self.pend) >= BATCH else 0

    def flush(self, final: bool = False) -> int:
        """Store the waiting jobs as points (once merged: whole points of ``per`` jobs, the
        rest waits unless ``final``); returns the change in stored points."""
        pend = self.pend
        if not pend:
            return 0
        if not self.merged:
            ts, start, levels, kinds, live = zip(*pend, strict=True)
            pend.clear()
            self.n.extend(repeat(1, len(ts)))
            self.ts.extend(ts)
            self.start.extend(start)
            self.lo.extend(levels)
            self.hi.extend(levels)
            self.top.extend(kinds)
            self.live.extend(live)
            return len(ts)
        per = self.per
        m = len(pend) if final else len(pend) - len(pend) % per
        if m == 0:
            return 0
        ts, start, levels, kinds, live = zip(*pend[:m], strict=True)
        del pend[:m]
        if self.stream is not None:
            self.stream.extend(levels, kinds)
        ck, cn, co = self.ck, self.cn, self.co
        for a in range(0, m, per):
            b = min(a + per, m)
            seg = levels[a:b]
            hi = max(seg)
            self.n.append(b - a)
            self.ts.append(ts[b - 1])
            self.start.append(min(start[a:b]))
            self.lo.append(min(seg))
            self.hi.append(hi)
            self.top.append(kinds[a + seg.index(hi)])
            self.live.append(live[b - 1])
            counts: dict[int, int] = {}
            _count_elements(counts, kinds[a:b])
            ck.extend(counts.keys())
            cn.extend(counts.values())
            co.append(len(ck))
        return -(-m // per)

    def finish(self) -> int:
        """Store the waiting jobs (before reading the series)."""
        return self.flush(final=True)

    def kinds_at(self, i: int) -> list[tuple[int, int]]:
        """(kind id, runs) of point ``i``."""
        if not self.merged:
            return [(self.top[i], 1)]
        a, b = self.co[i], self.co[i + 1]
        return list(zip(self.ck[a:b], self.cn[a:b], strict=True))

    def merge(self) -> int:
        """Merge neighbouring points (the next points hold twice the jobs); returns the
        change in stored points."""
        stored = self.finish()
        before = len(self.n)
        if not self.merged:
            self.merged = True
            self.ck = array("i", self.top)
            self.cn = array("I", [1]) * before
            self.co = array("I", range(before + 1))
        odd = before % 2

        def pairs(a: array[Any], fn: Any) -> array[Any]:
            out = array(a.typecode, map(fn, a[0::2], a[1::2]))
            if odd:
                out.append(a[-1])
            return out

        hi, tops = self.hi, self.top
        high = [h2 > h1 for h1, h2 in zip(hi[0::2], hi[1::2], strict=False)]
        top = array(
            "i",
            (t2 if up else t1 for t1, t2, up in zip(tops[0::2], tops[1::2], high, strict=False)),
        )
        if odd:
            top.append(tops[-1])
        self._merge_counts(before)
        self.n = pairs(self.n, int.__add__)
        self.ts = pairs(self.ts, _second)
        self.start = pairs(self.start, min)
        self.lo = pairs(self.lo, min)
        self.hi = pairs(hi, max)
        self.top = top
        self.live = pairs(self.live, _second)
        self.per *= 2
        return stored + len(self.n) - before

    def _merge_counts(self, before: int) -> None:
        ck, cn, co = self.ck, self.cn, self.co
        nk, nn, no = array("i"), array("I"), array("I", [0])
        for j in range(0, before, 2):
            a, b = co[j], co[min(j + 2, before)]
            merged: dict[int, int] = {}
            for k, c in zip(ck[a:b], cn[a:b], strict=True):
                merged[k] = merged.get(k, 0) + c
            nk.extend(merged.keys())
            nn.extend(merged.values())
            no.append(len(nk))
        self.ck, self.cn, self.co = nk, nn, no

    @property
    def jobs(self) -> int:
        return sum(self.n) + len(self.pend)


class SampleSeries:
    """Readings of a lifetime: ``level`` (its own process's memory: ``rss``, or ``total``
    for ``memwarden run``) and ``total`` (the gauge's figure the limits are judged on).
    Per point: ``n``, ``ts``, ``lo``/``hi`` of the level, ``tot`` the highest total."""

    __slots__ = ("hi", "lo", "n", "per", "tot", "ts")

    def __init__(self) -> None:
        self.n = array("I")
        self.ts = array("d")
        self.lo = array("d")
        self.hi = array("d")
        self.tot = array("d")
        self.per = 1

    def __len__(self) -> int:
        return len(self.n)

    def add(self, ts: float, level: float, total: float) -> int:
        if self.per > 1 and self.n and self.n[-1] < self.per:
            i = len(self.n) - 1
            self.n[i] += 1
            self.ts[i] = ts
            self.lo[i] = min(self.lo[i], level)
            self.hi[i] = max(self.hi[i], level)
            self.tot[i] = max(self.tot[i], total)
            return 0
        self.n.append(1)
        self.ts.append(ts)
        self.lo.append(level)
        self.hi.append(level)
        self.tot.append(total)
        return 1

    def merge(self) -> int:
        before = len(self.n)
        odd = before % 2

        def pairs(a: array[Any], fn: Any) -> array[Any]:
            out = array(a.typecode, map(fn, a[0::2], a[1::2]))
            if odd:
                out.append(a[-1])
            return out

        self.n = pairs(self.n, int.__add__)
        self.ts = pairs(self.ts, _second)
        self.lo = pairs(self.lo, min)
        self.hi = pairs(self.hi, max)
        self.tot = pairs(self.tot, max)
        self.per *= 2
        return len(self.n) - before

    @property
    def readings(self) -> int:
        return sum(self.n)


# ----------------------------------------------------------------------------- lifetimes
@dataclass(slots=True)
class Mark:
    """A point on the chart: a restart, kill, recycle, reclaim or OOM kill."""

    ts: float
    event: str  # reclaim | recycle | restart | kill | oom_kill
    total: float | None  # the gauge's figure (whole worker) at the time, if recorded
    own: float | None  # the process's own figure (RSS, or a pool child's USS)
    limit: float | None  # the limit that acted


@dataclass(slots=True)
class Life:
    """One process lifetime, reduced as it is read."""

    host: str | None
    pid: Any
    jobs: JobSeries = field(default_factory=JobSeries)
    samples: SampleSeries = field(default_factory=SampleSeries)
    first_ts: float = math.inf
    last_ts: float = -math.inf
    #: seconds of jobs and the earliest job start (how many jobs run at once)
    busy_s: float = 0.0
    jobs_from: float = math.inf
    timed_jobs: int = 0
    longest_s: float = 0.0  # the longest job
    forked: bool = False  # jobs ran in forked work horses
    run: bool = False  # readings by ``memwarden run`` of its command
    live_known: int = 0  # jobs with complete live-memory figures
    live_partial: int = 0  # jobs with live figures blind to some allocations
    reclaims: int = 0
    freed: float = 0.0
    restarts: int = 0
    recycles: int = 0
    kills: int = 0
    marks: list[Mark] = field(default_factory=list)
    marks_dropped: int = 0
    #: (ts, soft, hard) whenever the recorded limits change
    limits: list[tuple[float, float | None, float | None]] = field(default_factory=list)
    #: a pool child's own limit (its share), from its recycle records
    share: float | None = None
    # splitting state
    ended: float | None = None
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=5))
    level_ts: float = -math.inf

    @property
    def concurrency(self) -> float:
        """Jobs running at once on average (1: one at a time)."""
        span = self.last_job_ts - self.jobs_from
        if self.timed_jobs < 2 or span <= 0:
            return 1.0
        return max(1.0, self.busy_s / span)

    @property
    def last_job_ts(self) -> float:
        return self.jobs.ts[-1] if len(self.jobs.ts) else self.last_ts

    @property
    def stream(self) -> Streamed | None:
        """The streamed sustained level once the job series has merged (see Digest)."""
        return self.jobs.stream

    @property
    def has_data(self) -> bool:
        return len(self.jobs) > 0 or len(self.samples) > 0

    def timed(self, ts: float, duration: float) -> None:
        """A job of ``duration`` seconds that ended at ``ts``."""
        self.busy_s += duration
        self.timed_jobs += 1
        if duration > self.longest_s:
            self.longest_s = duration
        if ts - duration < self.jobs_from:
            self.jobs_from = ts - duration

    def mark(self, m: Mark) -> None:
        if len(self.marks) < MARKS:
            self.marks.append(m)
        else:
            self.marks_dropped += 1


def window_min(xs: Sequence[float], w: int) -> list[float]:
    """``min(xs[i:i + w])`` for each full window, in three passes (van Herk): minima
    from each block of ``w`` to its end and from its start, then of two of them. (Plain
    comparisons: the builtin ``min`` costs more than the loop around it.)"""
    n = len(xs)
    m = n - w + 1
    if m <= 0:
        return []
    suf = list(xs)  # suf[i]: min from i to the end of its block
    pre = list(xs)  # pre[i]: min from the start of its block to i
    for start in range(0, n, w):
        end = min(start + w, n)
        low = suf[end - 1]
        for i in range(end - 2, start - 1, -1):
            v = suf[i]
            if v < low:
                low = v
            else:
                suf[i] = low
        low = pre[start]
        for i in range(start + 1, end):
            v = pre[i]
            if v < low:
                low = v
            else:
                pre[i] = low
    return [a if a < b else b for a, b in zip(suf[:m], pre[w - 1 :], strict=False)]


class Streamed:
    """The sustained level (lowest over the next :data:`SUSTAIN` jobs) of a merged series,
    computed as jobs come, and the rises of its high-water mark credited to the kind of the
    job that made them (what :func:`memwarden.analysis.diagnose.attribute_bloat` does per job).
    Fed in batches (:meth:`extend`); the last ``SUSTAIN - 1`` jobs wait for their window."""

    __slots__ = ("growth", "kinds", "levels", "runs", "top")

    def __init__(self, levels: Sequence[float], kinds: Sequence[int]) -> None:
        self.levels: list[float] = []
        self.kinds: list[int] = []
        self.growth: defaultdict[int, float] = defaultdict(float)
        self.runs: Counter[int] = Counter()
        self.top: float | None = None
        self.extend(levels, kinds)

    def extend(self, levels: Sequence[float], kinds: Sequence[int]) -> None:
        lv = self.levels + list(levels)
        kd = self.kinds + list(kinds)
        low = window_min(lv, SUSTAIN)
        m = len(low)
        self.levels, self.kinds = lv[m:], kd[m:]
        if not m:
            return
        self.runs.update(kd[:m])
        top = low[0] if self.top is None else self.top
        growth = self.growth
        for i, level in enumerate(low):
            if level > top:
                growth[kd[i]] += level - top
                top = level
        self.top = top


# ----------------------------------------------------------------------------- digest
@dataclass(slots=True)
class ReasonGroup:
    """Restarts, recycles and kills of one cause and action."""

    cause: str
    action: str
    count: int = 0
    first: str = ""
    last: str = ""
    low: float | None = None
    high: float | None = None
    limit: float | None = None


#: Live-memory changes kept per kind (a uniform sample of its runs: reservoir sampling).
RESERVOIR = 512


@dataclass(slots=True)
class KindStats:
    runs: int = 0
    seen: float = 0.0  # RSS growth inside its own jobs (positive deltas)
    biggest: float = 0.0  # the largest rise inside one of its jobs
    seconds: float = 0.0
    #: live memory's change inside its own jobs, a sample of at most RESERVOIR runs
    live_deltas: list[float] = field(default_factory=list)
    live_runs: int = 0

    def keep(self, at: int, delta: float) -> None:
        if at == len(self.live_deltas):
            self.live_deltas.append(delta)
        else:
            self.live_deltas[at] = delta

    @property
    def live_median(self) -> float | None:
        return median(self.live_deltas) if self.live_deltas else None


class Digest:
    """Everything diagnose and report need from a journal, read once."""

    def __init__(self, validate: bool = True) -> None:
        self.validate = validate
        self.invalid = 0  # records refused by :func:`check` (when validating here)
        self.open: dict[tuple[str | None, Any], Life] = {}
        self.lives: list[Life] = []
        self.kind_ids: dict[str, int] = {}
        self.kind_names: list[str] = []
        self.kinds: list[KindStats] = []
        self.reasons: dict[tuple[str, str], ReasonGroup] = {}
        self.traces: dict[str, list[dict[str, Any]]] = {}
        self.oom_kills = 0
        self.pauses = 0
        self.soft: float | None = None
        self.hard: float | None = None
        self.quota: float | None = None
        self.share: float | None = None
        self.points = 0
        self._next_budget = BUDGET
        self._draw = 12345  # a fixed pseudo-random sequence: the same journal, one answer

    # -- input
    def add_all(self, records: Iterable[Record]) -> Digest:
        """Add every record. The cyclic garbage collector is paused meanwhile: records and
        waiting jobs make no cycles, and its passes over them cost a tenth of the time."""
        with _gc_paused():
            add = self.add
            for r in records:
                add(r)
        return self

    def read(self, paths: Iterable[str], summary: ReadSummary) -> Digest:
        """Add every valid record of journal files (:func:`memwarden.analysis.read.feed`);
        what reading met goes into ``summary``. The collector is paused, as in add_all."""
        with _gc_paused():
            feed(paths, summary, self._record, self._take_job, self._job)
        return self

    def add(self, r: Any) -> None:
        """One record; with ``validate``, one :func:`check` refuses is counted, not read."""
        if self._take_job(r):
            return
        if self.validate and check(r) is not None:
            self.invalid += 1
            return
        self._record(r)

    def _record(self, r: Record) -> None:
        """A record :func:`check` lets through."""
        ev = r["event"]
        if ev == "job":  # refused by _take_job, let through by check: cannot be
            self.invalid += 1
        elif ev == "sample":
            self._sample(r)
        elif ev in ("restart", "kill"):
            self._stop(r)
        elif ev == "reclaim":
            self._reclaim(r)
        elif ev == "trace":
            top = [t for t in r["top"][:10] if isinstance(t, dict)]
            self.traces[r["job"]] = top
        elif ev == "oom_kill":
            self.oom_kills += int(r.get("kills") or 1)
            if r.get("limit"):
                self.quota = float(r["limit"])
            life = self._life(r, None)
            life.mark(Mark(r["ts"], "oom_kill", None, None, r.get("limit")))
        elif ev == "start":
            self._start(r)
        elif ev == "exit":
            stopped = self.open.get(self._key(r, r.get("pid")))
            if stopped is not None and stopped.ended is None:
                stopped.ended = float(r["ts"])
        elif ev == "pause":
            self.pauses += 1

    @staticmethod
    def _key(r: Record, pid: Any) -> tuple[str | None, Any]:
        return (r.get("host") or r.get("hostname") or r.get("dyno"), pid)

    def _life(self, r: Record, level: float | None, pid: Any = None) -> Life:
        """The lifetime a record belongs to: the open one of its key, or a new one when
        the process was stopped and this record comes after, lower (a reused pid)."""
        pid = r.get("pid") if pid is None else pid
        key = self._key(r, pid)
        life = self.open.get(key)
        ts = float(r["ts"])
        if life is not None and level is not None and life.recent:
            gap = ts - life.level_ts > 300
            ended = life.ended
            if ended is not None or gap:  # only then can a new lifetime start here
                high = median(life.recent)
                fresh = ended is not None and (
                    level < 0.9 * high
                    or (r["event"] == "job" and ts - float(r.get("duration_s") or 0) > ended)
                )
                if fresh or (gap and level < 0.75 * high):
                    self.points += life.jobs.finish()
                    life = None
        if life is None:
            life = Life(key[0], pid)
            self.open[key] = life
            self.lives.append(life)
        if level is not None:
            life.recent.append(level)
            life.level_ts = ts
        if ts < life.first_ts:
            life.first_ts = ts
        if ts > life.last_ts:
            life.last_ts = ts
        return life

    def _kind(self, name: str) -> int:
        kid = self.kind_ids.get(name)
        if kid is None:
            if len(self.kind_names) >= KIND_IDS:
                return self._kind(OTHER) if name != OTHER else len(self.kind_names) - 1
            kid = self.kind_ids[name] = len(self.kind_names)
            self.kind_names.append(name)
            self.kinds.append(KindStats())
        return kid

    def _take_job(self, r: Any) -> bool:
        """Add a job record :func:`check` lets through and return True; False, nothing
        changed, for anything else. The hot path: one call per job record, each field
        read once (:func:`job_fields` checks them all in the same step)."""
        if type(r) is not dict or r.get("event") != "job":
            return False
        values = job_fields(r)
        if values is None:
            return False
        self._job(values, r)
        return True

    def _job(self, values: tuple[Any, ...], r: Any) -> None:
        """Add a job record: ``values`` those of :data:`JOB_FIELDS` (checked), ``r`` the
        record (a dict, or a ``JobLine`` msgspec decoded: ``journal_reader.fast_jobs``),
        read only on rare paths."""
        kind, pid, wp, host, hostname, dyno, ts, after, before, duration = values[:10]
        forked = wp is not None and wp != pid
        after = float(after)
        start_level = float(before) if before else after
        ts = float(ts)
        life = self.open.get((host or hostname or dyno, wp if forked else pid))
        if life is None or life.ended is not None or not life.recent or ts - life.level_ts > 300:
            record = (
                r if type(r) is dict else dict(zip(JOB_FIELDS, values, strict=True), event="job")
            )
            life = self._life(record, start_level, wp if forked else None)
        else:  # the common case, as _life does it
            life.recent.append(start_level)
            life.level_ts = ts
            if ts > life.last_ts:
                life.last_ts = ts
        if forked:
            level = start_level
            life.forked = True
        else:
            level = after
        live = _live_after(values, r, life)
        kid = self.kind_ids.get(kind)
        if kid is None:
            kid = self._kind(kind)
        jobs = life.jobs
        pend = jobs.pend
        pend.append((ts, ts - duration if duration else ts, level, kid, live))
        stats = self.kinds[kid]
        stats.runs += 1
        if live == live:  # known (not NaN)
            self._sample_live_change(stats, live, values)
        if before:
            rise = after - before
            if rise > 0:
                stats.seen += rise
                if rise > stats.biggest:
                    stats.biggest = rise
        if duration:
            stats.seconds += duration
            life.timed(ts, duration)
        if len(pend) >= BATCH:
            self._flush_jobs(life)

    def _sample_live_change(self, stats: KindStats, live: float, values: tuple[Any, ...]) -> None:
        """Keep live memory's change inside a job of ``stats``' kind in its sample (a
        reservoir: uniform over its runs); ``live`` the figure after it."""
        self._draw = draw = (self._draw * 1103515245 + 12345) & 0x7FFFFFFF
        stats.live_runs = seen = stats.live_runs + 1
        deltas = stats.live_deltas
        if len(deltas) < RESERVOIR or draw % seen < RESERVOIR:
            before_live = _live_before(values)
            if before_live is not None:
                stats.keep(
                    len(deltas) if len(deltas) < RESERVOIR else draw % RESERVOIR,
                    live - before_live,
                )

    def _flush_jobs(self, life: Life) -> None:
        """A batch of ``life``'s jobs into its series, merged when long or over budget."""
        jobs = life.jobs
        self.points += jobs.flush()
        if len(jobs.n) >= POINTS:
            self._merge_jobs(life)
        if self.points > self._next_budget:
            self._squeeze()

    def _merge_jobs(self, life: Life) -> None:
        jobs = life.jobs
        if jobs.exact:  # from here on the sustained level is streamed
            self.points += jobs.finish()
            jobs.stream = Streamed(jobs.lo, jobs.top)
        self.points += jobs.merge()

    def _sample(self, r: Record) -> None:
        run = "supervisor" in r
        total: Any = r.get("total")
        if run and not total:
            return  # a supervisor's own reading says nothing of its command
        level = float(total if run or not r.get("rss") else r["rss"])
        life = self._life(r, level)
        life.run = life.run or run
        self.points += life.samples.add(float(r["ts"]), level, float(total or level))
        if len(life.samples) >= POINTS:
            self.points += life.samples.merge()
        soft, hard = r.get("limit"), r.get("hard")
        if soft or hard:
            last = life.limits[-1] if life.limits else None
            if (last is None or last[1:] != (soft, hard)) and len(life.limits) < MARKS:
                life.limits.append((float(r["ts"]), soft, hard))
            self.soft = float(soft) if soft else self.soft
            self.hard = float(hard) if hard else self.hard
        if self.points > self._next_budget:
            self._squeeze()

    def _squeeze(self) -> None:
        """Over the budget: merge every long series once."""
        for life in self.lives:
            if len(life.jobs) > 64:
                self._merge_jobs(life)
            if len(life.samples) > 64:
                self.points += life.samples.merge()
        self._next_budget = max(BUDGET, self.points + BUDGET // 4)

    def _start(self, r: Record) -> None:
        key = self._key(r, r.get("pid"))
        life = self.open.get(key)
        if life is not None and life.has_data:
            self.points += life.jobs.finish()
            del self.open[key]
        self._life(r, None).run = True

    def _stop(self, r: Record) -> None:
        ev = r["event"]
        action = str(r.get("action") or ("kill" if ev == "kill" else "restart"))
        dry = bool(r.get("dry_run"))
        life = self._life(r, None)
        total, limit = r.get("total"), r.get("limit")
        what = action_word(ev, action, dry)
        if action == "recycle":
            life.recycles += 1
            if limit:
                life.share = self.share = float(limit)
            life.mark(Mark(r["ts"], "recycle", None, total, limit))
        elif ev == "kill":
            life.kills += 1
            life.mark(Mark(r["ts"], "kill", total, None, limit))
        else:
            life.restarts += 1
            if limit and not dry:
                self.soft = float(limit)
            life.mark(Mark(r["ts"], "restart", total, None, limit))
        cause = cause_of(r)
        if ev == "kill" and limit and cause in (Cause.OVER_HARD, Cause.PROJECTED_HARD):
            self.hard = float(limit)
        stops = action not in ("recycle", "none") and not dry
        if stops and life.ended is None:
            life.ended = float(r["ts"])
        reason = str(r.get("reason") or "")
        key = (cause_words(cause, action), what)
        group = self.reasons.get(key)
        if group is None:
            group = self.reasons[key] = ReasonGroup(key[0], what, first=reason)
        group.count += 1
        group.last = reason
        if total:
            group.low = total if group.low is None else min(group.low, total)
            group.high = total if group.high is None else max(group.high, total)
        if limit:
            group.limit = limit

    def _reclaim(self, r: Record) -> None:
        if r.get("dry_run"):
            return
        life = self._life(r, None)
        life.reclaims += 1
        life.freed += float(r.get("freed") or 0)
        life.mark(
            Mark(
                r["ts"],
                "reclaim",
                r.get("total_before"),
                r.get("rss_before") or r.get("rss_after"),
                None,
            )
        )

    # -- output
    def finish(self) -> list[Life]:
        """The lifetimes that hold readings, in order of their start."""
        for life in self.lives:
            life.jobs.finish()
        lives = [life for life in self.lives if life.has_data]
        lives.sort(key=lambda life: life.first_ts)
        return lives
