"""Where in the code: opt-in ``tracemalloc`` around a few runs of one job kind.

``MEMWARDEN_TRACE=<job kind>`` (or ``auto``: the kind this process's own job records blame
most, decided after :data:`AUTO_AFTER` jobs) traces the next ``MEMWARDEN_TRACE_RUNS`` runs
of that kind in one worker per host (a claim file in the state dir), then writes one
``trace`` record: the allocation sites that grew over those runs (``file:line``, bytes,
blocks, the source line). tracemalloc slows allocation-heavy code about 10×, so it is off
by default, bounded, and stopped afterwards (unless someone else had started it).

Also here: :func:`live_figures`, the live-memory figures the warden adds to ``job``
records, and :func:`live_bytes`, the one live-memory figure diagnose reads from them:

- ``blocks``: ``sys.getallocatedblocks()``, Python's small objects (pymalloc maps its arenas
  itself, so no malloc figure counts them); about :data:`BLOCK_BYTES` each.
- glibc: ``heap_in_use`` (``mallinfo2().uordblks``, bytes in use in the arenas) and
  ``mmapped`` (``hblkhd``, the chunks of 128 KiB and more that malloc serves by ``mmap``:
  a 5 MiB buffer kept per job moves ``mmapped``, never ``uordblks``).
- jemalloc: ``allocated`` (``stats.allocated``, every live malloc byte, small or large).

A few microseconds each on glibc, some tens under jemalloc (its ``epoch`` refresh):
``bench/live_figures.py``; :class:`LiveFigures` turns them off where that is dear.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import linecache
import logging
import os
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from functools import cache
from typing import Any

from memwarden import reclaim

log = logging.getLogger("memwarden")

AUTO_AFTER = 200  # jobs seen before ``auto`` picks a kind (and again every as many)
TOP = 10
_IGNORE = (tracemalloc.__file__, __file__, linecache.__file__, "<frozen importlib._bootstrap")


@cache
def _mallinfo2() -> Callable[[], Any] | None:
    libc = reclaim._libc()
    fn = getattr(libc, "mallinfo2", None) if libc else None
    if fn is None or reclaim.jemalloc_active():
        return None
    fn.restype = reclaim._Mallinfo2
    fn.argtypes = []
    return fn  # type: ignore[no-any-return]


#: Bytes per Python block, to put ``blocks`` on the malloc figures' scale (an estimate).
BLOCK_BYTES = 64


@cache
def _jemalloc_allocated() -> Callable[[], int | None] | None:
    """A reader of jemalloc's ``stats.allocated`` (after an ``epoch`` refresh), if usable."""
    mallctl = reclaim._jemalloc_mallctl()
    if mallctl is None:
        return None

    def read() -> int | None:
        epoch = ctypes.c_uint64(1)
        mallctl(b"epoch", None, None, ctypes.byref(epoch), ctypes.c_size_t(8))
        value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        got = mallctl(
            b"stats.allocated", ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)
        )
        return int(value.value) if got == 0 else None  # stats built out: ENOENT

    return read if read() is not None else None


def live_figures() -> dict[str, int]:
    """``blocks`` (Python's allocated blocks) and the allocator's live bytes: on glibc
    ``heap_in_use`` and ``mmapped``, under jemalloc ``allocated``."""
    out = {"blocks": sys.getallocatedblocks()}
    fn = _mallinfo2()
    if fn is not None:
        info = fn()
        out["heap_in_use"] = int(info.uordblks)
        out["mmapped"] = int(info.hblkhd)
        return out
    allocated = _jemalloc_allocated()
    if allocated is not None:
        value = allocated()
        if value is not None:
            out["allocated"] = value
    return out


def live_bytes(fields: dict[str, Any], suffix: str = "") -> float | None:
    """Live memory from a record's figures (``suffix`` ``"_before"`` for the job's start):
    the allocator's live bytes plus Python's blocks. None unless the figures see every
    allocator path: ``heap_in_use`` alone (journals before ``mmapped`` was recorded) or
    ``blocks`` alone is blind to big buffers."""
    blocks = fields.get("blocks" + suffix)
    allocated = fields.get("allocated" + suffix)
    if allocated is None:
        heap, mapped = fields.get("heap_in_use" + suffix), fields.get("mmapped" + suffix)
        if heap is None or mapped is None:
            return None
        allocated = heap + mapped
    return float(allocated) + BLOCK_BYTES * float(blocks or 0)


class LiveFigures:
    """:func:`live_figures` within a budget. ``sys.getallocatedblocks()`` walks every
    pymalloc pool, so it costs about 1 µs on a small heap and 100 µs with a million live
    objects: once a read costs more than 1% of the mean job time (and over 20 µs), the
    figures are turned off for the rest of this process, with one log line."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        #: the last reads' costs (seconds); their minimum is the cost: a preempted read only
        #: adds time, a dearer heap makes every read dearer
        self.costs: collections.deque[float] = collections.deque(maxlen=8)
        self.jobs = 0
        self.busy = 0.0

    def read(self) -> dict[str, int]:
        if not self.enabled:
            return {}
        t0 = time.perf_counter()
        out = live_figures()
        self.costs.append(time.perf_counter() - t0)
        return out

    @property
    def cost(self) -> float:
        return min(self.costs, default=0.0)

    def job_done(self, duration_s: float) -> None:
        if not self.enabled:
            return
        self.jobs += 1
        self.busy += duration_s
        budget = max(20e-6, 0.01 * self.busy / self.jobs)
        if self.jobs >= 20 and self.cost > budget:
            self.enabled = False
            log.info(
                "memwarden: live-memory figures off: a read takes %.0f µs, over 1%% of the "
                "mean job time",
                self.cost * 1e6,
            )


class Claim:
    """One worker per host traces a kind: ``O_EXCL`` file holding the tracer's pid, then
    ``done`` so no other worker traces that kind again. A dead holder's claim is taken over."""

    def __init__(self, state_dir: str, kind: str) -> None:
        digest = hashlib.sha1(kind.encode()).hexdigest()[:12]
        self.path = os.path.join(state_dir, f"trace-{digest}")

    def take(self) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self._stale():
                    return False
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def _stale(self) -> bool:
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return True
        if text == "done":
            return False
        try:
            pid = int(text)
        except ValueError:
            return False  # being written right now
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def done(self) -> None:
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write("done")
        os.replace(tmp, self.path)


class Tracer:
    """Called by the warden around every job; traces only the chosen kind's next runs."""

    def __init__(
        self,
        target: str,
        runs: int,
        state_dir: str,
        write: Callable[..., Any],
    ) -> None:
        self.target = target.strip()
        self.auto = self.target == "auto"
        self.kind: str | None = None if self.auto else self.target
        self.runs = max(1, runs)
        self.state_dir = state_dir
        self.write = write
        self.finished = False
        self._claim: Claim | None = None
        self._lock = threading.Lock()
        self._current: Any = None  # key of the run being traced
        self._before: tracemalloc.Snapshot | None = None
        self._grown: dict[tuple[str, int], list[int]] = {}
        self._done_runs = 0
        self._started_tracing = False
        self._seconds = 0.0
        self._history: list[dict[str, Any]] = []  # for auto: this process's job records

    # -- the warden's hooks
    def job_started(self, job: str, key: Any) -> None:
        if self.finished or job != self.kind or not self._ready():
            return
        with self._lock:
            if self._current is not None:
                return  # one traced run at a time
            self._current = key
        t0 = time.perf_counter()
        if not tracemalloc.is_tracing():
            tracemalloc.start(1)
            self._started_tracing = True
        self._before = self._snapshot()
        self._seconds += time.perf_counter() - t0

    def job_finished(self, record: dict[str, Any], key: Any) -> None:
        if self.finished:
            return
        if self.auto and self.kind is None:
            self._history.append(record)
            if len(self._history) % AUTO_AFTER == 0:
                self.kind = self._blame()
            return
        if self._current is None or key != self._current or self._before is None:
            return
        t0 = time.perf_counter()
        after = self._snapshot()
        for stat in after.compare_to(self._before, "lineno"):
            frame = stat.traceback[0]
            acc = self._grown.setdefault((frame.filename, frame.lineno), [0, 0])
            acc[0] += stat.size_diff
            acc[1] += stat.count_diff
        self._before = None
        self._done_runs += 1
        self._seconds += time.perf_counter() - t0
        with self._lock:
            self._current = None
        if self._done_runs >= self.runs:
            self._finish()

    # -- internals
    def _ready(self) -> bool:
        if self._claim is None:
            assert self.kind is not None
            claim = Claim(self.state_dir, self.kind)
            if not claim.take():
                log.info("memwarden: %s is traced by another worker; not here", self.kind)
                self.finished = True
                return False
            self._claim = claim
            log.warning(
                "memwarden: tracing %d runs of %s with tracemalloc (slower)", self.runs, self.kind
            )
        return True

    def _blame(self) -> str | None:
        from memwarden.analysis.diagnose import leak_suspects

        # the warden's job fields, as this process's journal records in order
        suspects = leak_suspects(
            {**r, "event": "job", "ts": float(i), "pid": 0} for i, r in enumerate(self._history)
        )
        if not suspects:
            if len(self._history) >= 10 * AUTO_AFTER:
                self._history = self._history[-5 * AUTO_AFTER :]
            return None
        log.info("memwarden: MEMWARDEN_TRACE=auto picked %s", suspects[0]["job"])
        self._history = []
        return str(suspects[0]["job"])

    @staticmethod
    def _snapshot() -> tracemalloc.Snapshot:
        return tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, pattern) for pattern in _IGNORE]
        )

    def _finish(self) -> None:
        self.finished = True
        if self._started_tracing:
            tracemalloc.stop()
        grown = sorted(self._grown.items(), key=lambda kv: -kv[1][0])
        top = [
            {
                "where": f"{_short(filename)}:{lineno}",
                "bytes": size,
                "count": count,
                "code": linecache.getline(filename, lineno).strip(),
            }
            for (filename, lineno), (size, count) in grown[:TOP]
            if size > 0
        ]
        self.write(
            "trace",
            job=self.kind,
            runs=self._done_runs,
            top=top,
            overhead_s=round(self._seconds, 6),
        )
        if self._claim is not None:
            with contextlib.suppress(OSError):
                self._claim.done()
        self._grown = {}


def _short(filename: str) -> str:
    """A path people can read: relative to the working directory or site-packages."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(filename)
        if not rel.startswith(".."):
            return rel
    return filename
