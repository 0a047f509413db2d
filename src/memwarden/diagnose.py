"""Leak, bloat or stable — and which job kind — from journal records alone.

Pure functions over records (DESIGN.md "Journal schema"); no framework, no numpy.

- **Lifetimes.** Records are grouped by ``pid`` and ordered by ``ts``; a pid seen again
  after a restart/kill with far less memory is a new lifetime (containers reuse pids).
- **Levels.** The memory level after each job is ``rss_after``; the *sustained* level is the
  minimum over the next few jobs, so a transient spike that comes back down counts for
  nothing.
- **Pattern**, per lifetime: a Theil–Sen slope (bytes per job) over the last half tells a
  leak (growth keeps going) from bloat (steps or a ramp that level off into a plateau);
  growth within the noise is stable. Lifetimes vote, weighted by their jobs. Live-memory
  figures in ``job`` records (``blocks``, ``heap_in_use``), when present, decide between
  leak (live memory grows) and bloat (RSS grows, live memory does not).
- **Attribution.** RSS growth often lands in a different job than the one that caused it
  (a leak fills free arena space, the next job needing fresh arenas takes the jump). So a
  leak is attributed from RSS by an event study over horizons of 4 to 64 jobs
  (:func:`attribute_events`), not by per-job deltas; from live-memory figures, which have
  no such delay, per job (:func:`attribute_leak`); bloat by which kind's runs raised the
  sustained high-water mark, net of chance (:func:`attribute_bloat`).
"""

from __future__ import annotations

import collections
import gzip
import itertools
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import click

from memwarden.journal import read_records
from memwarden.units import format_size

MiB = 1024 * 1024
#: Bytes per Python block, to put ``blocks`` and ``heap_in_use`` on one scale (an estimate).
BLOCK_BYTES = 64
MIN_JOBS = 12  # fewer jobs in a lifetime say nothing about its shape
MAX_KINDS = 24  # kinds in the regression; the rest are pooled as OTHER
MAX_ROWS = 6000  # regression rows (evenly thinned; cumulative counts stay exact)
OTHER = "(other kinds)"


# ----------------------------------------------------------------------------- statistics
def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return 0.0
    mid = n // 2
    return float(s[mid]) if n % 2 else (s[mid - 1] + s[mid]) / 2.0


def theil_sen(ys: Sequence[float], max_points: int = 120) -> float:
    """Median of pairwise slopes of ``ys`` against their index (bins medians when long)."""
    n = len(ys)
    if n < 2:
        return 0.0
    if n > max_points:
        step = n / max_points
        pts = []
        for b in range(max_points):
            lo, hi = int(b * step), max(int((b + 1) * step), int(b * step) + 1)
            pts.append(((lo + hi - 1) / 2.0, median(ys[lo:hi])))
    else:
        pts = [(float(i), float(y)) for i, y in enumerate(ys)]
    slopes = [
        (pts[j][1] - pts[i][1]) / (pts[j][0] - pts[i][0])
        for i in range(len(pts))
        for j in range(i + 1, len(pts))
    ]
    return median(slopes)


def sustained(ys: Sequence[float], window: int) -> list[float]:
    """``min(ys[i : i + window])``: the level that stays, spikes removed (monotone deque).

    In the last ``window - 1`` jobs a rise cannot be confirmed yet: the level is held."""
    n = len(ys)
    out: list[float] = [0.0] * n
    q: collections.deque[int] = collections.deque()  # increasing values, from the right
    for i in range(n - 1, -1, -1):
        while q and ys[q[-1]] >= ys[i]:
            q.pop()
        q.append(i)
        while q[0] >= i + window:
            q.popleft()
        out[i] = float(ys[q[0]])
    for i in range(max(1, n - window + 1), n):
        out[i] = min(out[i], out[i - 1])
    return out


def nnls(rows: list[list[float]], ys: list[float], sweeps: int = 3000) -> list[float]:
    """Non-negative least squares by coordinate descent on the (scaled) normal equations."""
    k = len(rows[0]) if rows else 0
    gram = [[0.0] * k for _ in range(k)]
    rhs = [0.0] * k
    for row, y in zip(rows, ys, strict=True):
        nz = [(j, v) for j, v in enumerate(row) if v]
        for a, va in nz:
            rhs[a] += va * y
            g = gram[a]
            for b, vb in nz:
                g[b] += va * vb
    scale = [math.sqrt(gram[j][j]) if gram[j][j] > 0 else 0.0 for j in range(k)]
    beta = [0.0] * k
    for _ in range(sweeps):
        moved = 0.0
        for j in range(k):
            if scale[j] == 0.0:
                continue
            g = gram[j]
            grad = rhs[j] - sum(g[m] * beta[m] for m in range(k))
            new = max(0.0, beta[j] + grad / gram[j][j])
            moved = max(moved, abs(new - beta[j]) * scale[j])
            beta[j] = new
        if moved <= 1e-9 * (1.0 + max(abs(y) for y in ys)):
            break
    return beta


# ----------------------------------------------------------------------------- lifetimes
@dataclass
class Lifetime:
    """One process lifetime: its records in time order."""

    pid: Any
    jobs: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    reclaims: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)
    traces: list[dict[str, Any]] = field(default_factory=list)

    @property
    def start(self) -> float:
        firsts = [r[0]["ts"] for r in (self.jobs, self.samples) if r]
        return min(firsts) if firsts else 0.0

    def levels(self) -> list[float]:
        """Memory after each job (RSS); the watchdog's samples when jobs are too few (long
        jobs, or a pool parent that runs none)."""
        if len(self.jobs) >= MIN_JOBS or len(self.samples) < MIN_JOBS:
            return self.job_levels()
        return [float(s.get("rss") or s.get("total") or 0) for s in self.samples]

    def job_levels(self) -> list[float]:
        return [float(j["rss_after"]) for j in self.jobs]

    def live(self) -> list[float] | None:
        """Live memory after each job (``heap_in_use`` + ``blocks`` × 64), when recorded."""
        if not self.jobs or not all(("blocks" in j or "heap_in_use" in j) for j in self.jobs):
            return None
        return [
            float(j.get("heap_in_use") or 0) + BLOCK_BYTES * float(j.get("blocks") or 0)
            for j in self.jobs
        ]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _valid(r: dict[str, Any]) -> bool:
    if not _number(r.get("ts")):
        return False
    ev = r["event"]
    if ev == "job":
        return isinstance(r.get("job"), str) and _number(r.get("rss_after"))
    if ev == "sample":
        return _number(r.get("rss")) or _number(r.get("total"))
    return True


def lifetimes(records: Iterable[dict[str, Any]]) -> tuple[list[Lifetime], int]:
    """Split records into lifetimes; returns them and the count of unusable records."""
    by_pid: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    bad = 0
    for r in records:
        if _valid(r):  # pids repeat across hosts (pid 1 in every container)
            by_pid[(r.get("host") or r.get("hostname") or r.get("dyno"), r.get("pid"))].append(r)
        else:
            bad += 1
    out: list[Lifetime] = []
    for (_, pid), recs in by_pid.items():
        recs.sort(key=lambda r: r["ts"])
        life = Lifetime(pid)
        ended = None  # when a restart/kill was recorded: a new job or a drop after is a new process
        recent: list[float] = []  # the last few levels (their median ignores a spike)
        last_ts = None
        for r in recs:
            level = _level(r)
            if level is not None and recent:
                high = median(recent)
                gap = last_ts is not None and r["ts"] - last_ts > 300
                fresh = ended is not None and (
                    level < 0.9 * high
                    or (r["event"] == "job" and r["ts"] - float(r.get("duration_s") or 0) > ended)
                )
                if fresh or (gap and level < 0.75 * high):
                    out.append(life)
                    life, ended, recent = Lifetime(pid), None, []
            if level is not None:
                recent = [*recent[-4:], level]
                last_ts = r["ts"]
            _add(life, r)
            stops = r.get("action") not in ("recycle", "none") and not r.get("dry_run")
            if r["event"] in ("restart", "kill") and stops and ended is None:
                ended = float(r["ts"])
        out.append(life)
    out = [life for life in out if life.jobs or life.samples]
    out.sort(key=lambda life: life.start)
    return out, bad


def _level(r: dict[str, Any]) -> float | None:
    if r["event"] == "job":
        return float(r.get("rss_before") or r["rss_after"])
    if r["event"] == "sample":
        return float(r.get("rss") or r.get("total") or 0)
    return None


def _add(life: Lifetime, r: dict[str, Any]) -> None:
    bucket = {
        "job": life.jobs,
        "sample": life.samples,
        "reclaim": life.reclaims,
        "restart": life.restarts,
        "kill": life.kills,
        "trace": life.traces,
    }.get(r["event"])
    if bucket is not None:
        bucket.append(r)


# ----------------------------------------------------------------------------- pattern
@dataclass
class Shape:
    """The evidence about one lifetime's memory curve."""

    pid: Any
    jobs: int
    start_bytes: float
    end_bytes: float
    peak_bytes: float
    growth_bytes: float
    tail_slope: float  # bytes per job over the last half
    tail_growth_bytes: float
    step_share: float  # share of the rise made by the 3 biggest sustained steps
    plateau_jobs: int  # jobs since the sustained level last rose noticeably
    noise_bytes: float
    live_tail_growth_bytes: float | None
    verdict: str
    confidence: float

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


def window_for(n: int) -> int:
    return max(3, min(20, n // 60))


def shape_of(life: Lifetime) -> Shape | None:
    ys = life.levels()
    n = len(ys)
    if n < MIN_JOBS:
        return None
    s = sustained(ys, window_for(n))
    k = max(3, min(n // 10, 300))  # the start: after warm-up, before a long life's steps
    start, end = median(s[:k]), median(s[-k:])
    growth = end - start
    half = s[n // 2 :]
    tail_slope = theil_sen(half)
    tail_growth = tail_slope * (len(half) - 1)
    diffs = [ys[i] - ys[i - 1] for i in range(1, n)]
    mid = median(diffs)
    noise = 1.4826 * median([abs(d - mid) for d in diffs]) / math.sqrt(2)
    marks = list(itertools.accumulate(s, max))  # the high-water mark after each job
    rises = sorted((marks[i] - marks[i - 1] for i in range(1, n)), reverse=True)
    total_rise = sum(rises)
    step_share = sum(rises[:3]) / total_rise if total_rise > 0 else 0.0
    # plateau: jobs since the high-water mark came within reach of its final height
    tol = max(3 * noise, 0.05 * max(growth, 0.0), 256 * 1024)
    last_low = max((i for i, v in enumerate(marks) if v < marks[-1] - tol), default=-1)
    plateau = n - 1 - last_low
    meaningful = max(4 * noise, 0.03 * start, 2 * MiB)
    live = life.live()
    live_tail = None
    if live is not None:
        lh = live[n // 2 :]
        live_tail = theil_sen(lh) * (len(lh) - 1)
    # a leak makes new highs: the end stands above everything the first half reached
    new_high = end - max(s[: n // 2])
    # a big step in the very first jobs (not warm-up-sized) that stays is a high-water mark
    first = median(s[:3])
    early = end - first
    verdict, conf = _verdict(growth, tail_growth, new_high, meaningful, plateau, n, live_tail)
    if verdict == "stable" and early >= max(0.25 * first, 4 * meaningful):
        verdict, conf = "bloat", 0.6
    return Shape(
        life.pid,
        n,
        start,
        end,
        max(s),
        growth,
        tail_slope,
        tail_growth,
        step_share,
        plateau,
        noise,
        live_tail,
        verdict,
        conf,
    )


def _verdict(
    growth: float,
    tail: float,
    new_high: float,
    meaningful: float,
    plateau: int,
    n: int,
    live_tail: float | None,
) -> tuple[str, float]:
    rise = max(growth, tail)
    if live_tail is not None and live_tail >= meaningful:
        # live memory keeps growing over the last half: objects are kept — a leak
        return "leak", _clip(0.6 + 0.4 * min(1.0, live_tail / (3 * meaningful)))
    if rise < meaningful:
        return "stable", _clip(1.0 - rise / meaningful)
    if live_tail is not None:
        # RSS grew, live memory did not: the allocator keeps freed memory — bloat
        return "bloat", _clip(0.6 + 0.4 * (1.0 - max(0.0, live_tail) / meaningful))
    share = tail / growth if growth > 0 else 1.0
    if tail >= meaningful and share >= 0.2 and new_high >= meaningful / 2:
        strength = min(1.0, tail / (2 * meaningful)) * min(1.0, share / 0.4)
        return "leak", _clip(0.5 + 0.5 * strength)
    flat = plateau / n
    strength = max(1.0 - max(0.0, share) / 0.2, min(1.0, 2 * flat)) * min(1.0, growth / meaningful)
    return "bloat", _clip(0.5 + 0.5 * strength)


def _clip(x: float) -> float:
    return max(0.0, min(1.0, x))


def vote(shapes: list[Shape]) -> tuple[str, float]:
    """The lifetimes' verdicts, weighted by jobs (√ so one long lifetime cannot drown all)."""
    if not shapes:
        return "stable", 0.0
    score: Counter[str] = Counter()
    weight = 0.0
    for sh in shapes:
        w = math.sqrt(sh.jobs)
        score[sh.verdict] += w * sh.confidence
        weight += w
    pattern, best = score.most_common(1)[0]
    return pattern, round(_clip(best / weight), 3)


# ----------------------------------------------------------------------------- attribution
def _kinds(lives: list[Lifetime]) -> list[str]:
    runs = Counter(j["job"] for life in lives for j in life.jobs)
    kinds = [k for k, _ in runs.most_common(MAX_KINDS)]
    return kinds


def attribution_window(lives: list[Lifetime]) -> int:
    """Jobs per window: long enough that the rarest blamed kind runs a few times in one
    (so growth that lands a few jobs late stays in its window), short enough for many."""
    runs = Counter(j["job"] for life in lives for j in life.jobs)
    total = sum(runs.values())
    if not total:
        return 1
    rare = min((v / total for v in runs.values() if v / total >= 0.02), default=0.02)
    steady = max((len(life.jobs) * 4 // 5 for life in lives), default=0)
    return int(max(12, min(3 / rare, 60, max(12, steady // 8))))


def attribute_leak(
    lives: list[Lifetime], live: bool = False, window: int | None = None
) -> dict[str, dict[str, float]]:
    """Bytes per run for each kind: NNLS of the level's change over windows of jobs on how
    many times each kind ran in the window.

    Not per job: growth often lands in a later job than the one that caused it, and a
    window holds both. Not the raw level on cumulative counts either: the level's noise is
    autocorrelated (high-water marks, allocator state) and cumulative counts are random
    walks, which regress spuriously on each other. Windows overlap by half. Per lifetime
    the first fifth (warm-up) is left out. ``live`` uses live-memory figures, which count
    allocated bytes rather than pages and so show growth in the job that made it: there the
    window is one job (the NNLS is then each kind's mean change, floored at zero)."""
    kinds = _kinds(lives)
    index = {k: i for i, k in enumerate(kinds)}
    width = len(kinds) + 1  # last column pools the rare kinds
    # Live memory counts allocated bytes, not pages: no arena delay, so per job.
    h = window or (1 if live else attribution_window(lives))
    stride = max(1, h // 2)
    rows: list[list[float]] = []
    ys: list[float] = []
    runs: Counter[str] = Counter()
    for life in lives:
        n = len(life.jobs)
        if n < MIN_JOBS:
            continue
        series = life.live() if live else sustained(life.job_levels(), window_for(n))
        if series is None:
            continue
        skip = n // 5
        cols = [index.get(j["job"], width - 1) for j in life.jobs]
        for j in life.jobs[skip:]:
            runs[j["job"]] += 1
        size = min(h, n - skip - 1)
        for a in range(skip, n - size, stride):
            b = a + size  # window: jobs a+1 .. b, change from after job a to after job b
            row = [0.0] * width
            for c in cols[a + 1 : b + 1]:
                row[c] += 1
            rows.append(row)
            ys.append(series[b] - series[a])
    if not rows:
        return {}
    if len(rows) > MAX_ROWS:
        step = len(rows) / MAX_ROWS
        keep = [int(i * step) for i in range(MAX_ROWS)]
        rows, ys = [rows[i] for i in keep], [ys[i] for i in keep]
    beta = nnls(rows, ys)
    out: dict[str, dict[str, float]] = {}
    for kind, b in zip([*kinds, OTHER], beta, strict=True):
        n_runs = runs[kind] if kind != OTHER else sum(v for k, v in runs.items() if k not in index)
        if n_runs:
            out[kind] = {"per_run_bytes": b, "growth_bytes": b * n_runs, "runs": n_runs}
    return out


def _trimmed(xs: list[float], cut: float = 0.1) -> tuple[float, float, int]:
    """Mean, variance and count of ``xs`` without the lowest and highest ``cut`` share."""
    s = sorted(xs)
    k = int(len(s) * cut)
    s = s[k : len(s) - k] or s
    m = sum(s) / len(s)
    return m, sum((x - m) ** 2 for x in s) / max(1, len(s) - 1), len(s)


HORIZONS = (4, 8, 16, 32, 64)


def attribute_events(lives: list[Lifetime]) -> dict[str, dict[str, float]]:
    """Bytes per run for each kind from RSS, as an event study over several horizons.

    For each run of a kind: the sustained level's change from just before it to ``h`` jobs
    past it, against the same change after any job (trimmed means: a fragmentation step
    or a trim in a few stretches cannot steer it). Growth a kind causes may land in a later
    job (a leak fills free arena space, the next job needing fresh heap takes the jump),
    so short horizons blame the job that showed it; but that job's effect does not last —
    the next time it has less to pay back — while the cause's keeps growing with ``h``.
    So the evidence for a kind is its z-score summed over horizons 4 to 64 jobs, and its
    bytes per run the mean of its positive estimates, shrunk by (evidence / the best
    kind's evidence)² so a weakly supported kind's noisy estimate cannot outweigh the
    clear culprit. A difference of means against the
    overall rate, not a regression on counts (window counts add up to the window length
    and let a frequent kind stand in for the drift)."""
    levels = []
    for life in lives:
        n = len(life.jobs)
        if n >= MIN_JOBS:
            levels.append((life, sustained(life.job_levels(), window_for(n)), max(1, n // 5)))
    # the sustained level at i already sees a few jobs ahead (a rise just after job i
    # can show in it): the "before" reference is taken a few jobs back (at most 5: longer
    # stretches gather the big swings of a fragmented heap)
    runs: Counter[str] = Counter()
    for life, _, skip in levels:
        runs.update(j["job"] for j in life.jobs[skip:])
    total = sum(runs.values())
    z: Counter[str] = Counter()
    estimates: dict[str, list[float]] = defaultdict(list)
    longest = max((len(s) - skip for _, s, skip in levels), default=0)
    for h in HORIZONS:
        if h > max(HORIZONS[0], longest // 8):  # a few independent stretches at least
            break
        gains: dict[str, list[float]] = defaultdict(list)
        every: list[float] = []
        for life, s, skip in levels:
            back = min(window_for(len(s)), 5)
            for i in range(max(skip, back), len(s) - h):
                g = s[i + h] - s[i - back]
                gains[life.jobs[i]["job"]].append(g)
                every.append(g)
        if len(every) < 20:
            continue
        mb, vb, nb = _trimmed(every)
        for kind, g in gains.items():
            if len(g) < 5:
                continue
            m, v, nk = _trimmed(g)
            effect = (m - mb) / max(1e-9, 1 - runs[kind] / total)
            se = math.sqrt(v / nk + vb / nb)
            z[kind] += effect / se if se > 0 else 0.0
            estimates[kind].append(effect)
    out: dict[str, dict[str, float]] = {}
    best = max(z.values(), default=0.0)
    for kind, zs in z.items():
        positive = [e for e in estimates[kind] if e > 0]
        per_run = sum(positive) / len(positive) if zs > 0 and positive else 0.0
        per_run *= min(1.0, zs / best) ** 2 if best > 0 else 0.0
        out[kind] = {
            "per_run_bytes": per_run,
            "growth_bytes": per_run * runs[kind],
            "runs": runs[kind],
            "evidence": zs,
        }
    return out


def attribute_bloat(lives: list[Lifetime]) -> dict[str, dict[str, float]]:
    """Bytes each kind added to the sustained high-water mark, less what any kind adds by
    chance per run (the median kind's rate: noise lifts the mark in whichever job runs).

    Bloat rises in a few steps, in the job whose peak set the new mark, so the rise is
    credited to that job (a regression over windows spreads a few sparse steps over every
    kind that ran near them)."""
    growth: Counter[str] = Counter()
    runs: Counter[str] = Counter()
    for life in lives:
        n = len(life.jobs)
        if n < 2:
            continue
        s = sustained(life.job_levels(), window_for(n))
        top = s[0]
        for i, j in enumerate(life.jobs):
            runs[j["job"]] += 1
            if i and s[i] > top:
                growth[j["job"]] += s[i] - top
            top = max(top, s[i])
    floor = median([growth[k] / runs[k] for k in runs]) if len(runs) > 2 else 0.0
    out = {}
    for k in runs:
        per_run = max(0.0, growth[k] / runs[k] - floor)
        out[k] = {"per_run_bytes": per_run, "growth_bytes": per_run * runs[k], "runs": runs[k]}
    return out


def rank(attrib: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    total = sum(max(0.0, v["growth_bytes"]) for v in attrib.values())
    out = []
    for kind, v in sorted(attrib.items(), key=lambda kv: -kv[1]["growth_bytes"]):
        if v["growth_bytes"] <= 0 or total <= 0:
            continue
        share = v["growth_bytes"] / total
        if share < 0.02:
            continue
        entry = {
            "job": kind,
            "growth_bytes": int(v["growth_bytes"]),
            "share": round(share, 3),
            "runs": int(v["runs"]),
            "per_run_bytes": int(v["per_run_bytes"]),
        }
        if "evidence" in v:  # the event study's z-score, summed over horizons
            entry["evidence"] = round(v["evidence"], 1)
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- verdict
def diagnose(records: Iterable[dict[str, Any]], skipped_lines: int = 0) -> dict[str, Any]:
    """The verdict over journal records: pattern, confidence, suspects, advice, evidence."""
    lives, bad = lifetimes(records)
    shapes = [sh for sh in (shape_of(life) for life in lives) if sh is not None]
    pattern, confidence = vote(shapes)
    with_live = [life for life in lives if life.live() is not None]
    live_used = bool(with_live) and len(with_live) * 2 >= len([li for li in lives if li.jobs])
    if pattern == "leak":
        attrib = attribute_leak(with_live, live=True) if live_used else {}
        if not rank(attrib):
            attrib = attribute_events(lives)
        if not rank(attrib):
            attrib = attribute_leak(lives)
        if not rank(attrib):  # the regression found nothing: fall back to the high-water mark
            attrib = attribute_bloat(lives)
    elif pattern == "bloat":
        attrib = attribute_bloat(lives)
    else:
        attrib = {}
    suspects = rank(attrib)
    traces = _traces(lives)
    for s in suspects:
        if s["job"] in traces:
            s["trace"] = traces[s["job"]]
    reclaims = [r for life in lives for r in life.reclaims if not r.get("dry_run")]
    restarts = Counter(
        _reason(r.get("reason")) for life in lives for r in life.restarts + life.kills
    )
    evidence = {
        "lifetimes": len(lives),
        "jobs": sum(len(life.jobs) for life in lives),
        "kinds": len({j["job"] for life in lives for j in life.jobs}),
        "verdicts": dict(Counter(sh.verdict for sh in shapes)),
        "live_memory": live_used,
        "reclaims": len(reclaims),
        "reclaimed_bytes": int(sum(float(r.get("freed") or 0) for r in reclaims)),
        "restart_reasons": dict(restarts),
        "shapes": [sh.as_dict() for sh in sorted(shapes, key=lambda sh: -sh.jobs)[:20]],
        "traces": {k: v for k, v in traces.items() if k not in {s["job"] for s in suspects}},
    }
    return {
        "pattern": pattern,
        "confidence": confidence,
        "suspects": suspects,
        "advice": advise(pattern, suspects, shapes, reclaims, lives),
        "skipped_lines": skipped_lines,
        "skipped_records": bad,
        "evidence": evidence,
    }


def _reason(text: Any) -> str:
    t = str(text or "").lower()
    if "hard limit" in t:
        return "hard_limit"
    if "still running" in t:
        return "shutdown_timeout"
    if "soft limit" in t:
        return "soft_limit"
    return "other"


def _traces(lives: list[Lifetime]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for life in lives:
        for t in life.traces:
            if isinstance(t.get("job"), str) and isinstance(t.get("top"), list):
                out[t["job"]] = t["top"][:10]
    return out


def advise(
    pattern: str,
    suspects: list[dict[str, Any]],
    shapes: list[Shape],
    reclaims: list[dict[str, Any]],
    lives: list[Lifetime],
) -> list[str]:
    if pattern == "stable" or not shapes:
        spread = max((sh.peak_bytes - sh.start_bytes for sh in shapes), default=0.0)
        rise = format_size(spread)
        return [f"Nothing to do: memory stays level (sustained rise at most {rise})."]
    first = suspects[0]["job"] if suspects else None
    plateau = max(sh.peak_bytes for sh in shapes)
    if pattern == "bloat":
        out = []
        if first:
            out.append(
                f"{first} raises the high-water mark ({format_size(suspects[0]['growth_bytes'])}"
                f" over {suspects[0]['runs']} runs): make its peak smaller (batches, streaming)."
            )
        if reclaims:
            freed = sum(float(r.get("freed") or 0) for r in reclaims)
            out.append(
                f"Reclaim (gc + malloc_trim) freed {format_size(freed)} in {len(reclaims)} "
                f"reclaims (mean {format_size(freed / len(reclaims))}): keep MEMWARDEN_RECLAIM "
                "on; it gets bloat back without a restart."
            )
        else:
            out.append(
                "Reclaim before restarting (MEMWARDEN_RECLAIM=true, the default): gc + "
                "malloc_trim(0) gives glibc's free pages back without a restart."
            )
        out += [
            "On glibc with threads: MALLOC_ARENA_MAX=2 (fewer arenas, less fragmentation).",
            "Or jemalloc with background purging: LD_PRELOAD=libjemalloc.so.2 "
            "MALLOC_CONF=background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0",
            f"Memory levels off at about {format_size(plateau)}: a soft limit above that "
            "(with margin) avoids restarts that cannot help for long.",
        ]
        return out
    out = []
    if first:
        per = suspects[0]["per_run_bytes"]
        out.append(
            f"Profile {first} (about {format_size(per)} kept per run): MEMWARDEN_TRACE={first} "
            "runs tracemalloc around its next runs on one worker and writes `trace` records "
            "(file:line); or memray (`memray run -o job.bin <worker>`, or `memray attach PID`)."
        )
    else:
        out.append(
            "Set MEMWARDEN_TRACE=auto: tracemalloc around the most-blamed kind on one worker."
        )
    out.append(
        "Until it is fixed, restarts at the soft limit keep workers inside the quota; "
        "reclaim and allocator settings cannot help a leak."
    )
    return out


# ----------------------------------------------------------------------------- input / CLI
def load(paths: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
    """Records of the given journal files (``-`` stdin, ``.gz`` gzipped), bad-line count."""
    records: list[dict[str, Any]] = []
    bad = 0
    for path in paths:
        if path == "-":
            recs, b = read_records(sys.stdin)
        else:
            opener: Any = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                recs, b = read_records(f)
        records.extend(recs)
        bad += b
    return records, bad


def render(result: dict[str, Any]) -> str:
    ev = result["evidence"]
    lines = [
        f"Verdict: {result['pattern'].upper()} (confidence {result['confidence']:.2f}) "
        f"over {ev['jobs']} jobs in {ev['lifetimes']} process lifetime(s), "
        f"{ev['kinds']} job kinds" + ("; live-memory figures used" if ev["live_memory"] else ""),
    ]
    shapes = ev["shapes"]
    if shapes:
        sh = shapes[0]
        lines.append(
            f"Longest lifetime (pid {sh['pid']}, {sh['jobs']} jobs): "
            f"{format_size(sh['start_bytes'])} -> {format_size(sh['end_bytes'])}, "
            f"last-half slope {format_size(sh['tail_slope'])}/job, "
            f"top-3 steps {sh['step_share']:.0%} of the rise, plateau {sh['plateau_jobs']} jobs"
        )
    if result["suspects"]:
        lines += ["", f"{'job kind':<32} {'growth':>10} {'share':>6} {'runs':>7} {'per run':>10}"]
        for s in result["suspects"]:
            lines.append(
                f"{s['job'][:32]:<32} {format_size(s['growth_bytes']):>10} {s['share']:>6.0%} "
                f"{s['runs']:>7} {format_size(s['per_run_bytes']):>10}"
            )
            for t in s.get("trace", [])[:5]:
                lines.append(
                    f"    {t.get('where')}: +{format_size(t.get('bytes'))} "
                    f"({t.get('count')} blocks)  {t.get('code') or ''}".rstrip()
                )
    lines += ["", "Advice:"] + [f"- {a}" for a in result["advice"]]
    skipped = result["skipped_lines"] + result.get("skipped_records", 0)
    if skipped:
        lines.append(f"({skipped} malformed or truncated lines/records skipped)")
    return "\n".join(lines)


@click.command("diagnose")
@click.argument("journals", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def diagnose_command(journals: tuple[str, ...], as_json: bool) -> None:
    """Leak, bloat or stable, and which job kind: from journal files (- for stdin)."""
    try:
        records, bad = load(journals)
    except OSError as exc:
        raise click.ClickException(str(exc)) from exc
    result = diagnose(records, skipped_lines=bad)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else render(result))
