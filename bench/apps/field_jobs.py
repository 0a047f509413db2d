"""The job code of ``bench/field.py``: one job, ``run(job_id, kind, mb, secs)``, for every
framework's app (``field_<framework>.py``), and the records the bench counts.

Every run adds one to ``{FIELD_PREFIX}:runs`` (hash keyed by the bench's job id) before it
works, and every completion one to ``{FIELD_PREFIX}:done``: lost = ids never done,
duplicates = completions beyond the first. The bench's job id is also the framework's own
job id, so the journal's ``in_flight`` lists and poison records name the same ids.

Kinds (the workloads; memory really allocated, every page touched):

- ``light``: a little CPU, then ``secs`` of waiting (I/O).
- ``leak``: keeps ``mb`` MiB for good, in 64 KiB pieces spread over ``secs``.
- ``bigleak``: the same in 256 KiB pieces (over glibc's mmap threshold: each one its own
  mapping, nothing for ``malloc_trim`` to give back).
- ``fragment``: two threads allocate ``mb`` MiB of mixed-size buffers and keep one in 20
  (glibc's stair-step, :func:`memwarden.workload.fragment`), then ``secs`` of waiting.
- ``spike``: grows the worker's cgroup to ``mb`` MiB (its working set when the job starts,
  what the worker's other jobs hold included; 8 MiB at least) over half of ``secs``, holds,
  lets go.
- ``poison``: grows ``mb`` MiB a second without end (up to ``FIELD_CAP_MB``, then holds a
  minute and completes: a guard that never stops it shows as a poison job done).
- ``runaway``: on its first run, grows ``mb`` MiB a second (hundreds) up to
  ``FIELD_CAP_MB``; on later runs, light.

Each kind is a generator of waits, so the arq app can await them and the others sleep.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from typing import Any

import redis

from memwarden import workload
from memwarden.gauges.cgroup import Cgroup

MB = 1024 * 1024
PREFIX = os.environ.get("FIELD_PREFIX", "mw-field")
REDIS_URL = os.environ.get("FIELD_REDIS", "redis://127.0.0.1:6379/11")
CAP_MB = int(os.environ.get("FIELD_CAP_MB", "4096"))
#: What the jobs keep, module-wide: it outlives the job, as a real leak does.
KEPT: list[object] = []

_store: Any = None  # redis.Redis (typed Any: redis-py's stubs mix in its async returns)


def store() -> Any:
    """This process's Redis client (a forked child makes its own)."""
    global _store
    if _store is None or _store.connection_pool.pid != os.getpid():
        _store = redis.Redis.from_url(REDIS_URL)
    return _store


def started(job_id: str) -> int:
    """Count a run of ``job_id``; returns which run this is (1: the first)."""
    return int(store().hincrby(f"{PREFIX}:runs", job_id, 1))


def finished(job_id: str) -> None:
    store().hincrby(f"{PREFIX}:done", job_id, 1)


def steps(kind: str, mb: float, secs: float, attempt: int, seed: int = 0) -> Iterator[float]:
    """Do the work of one job of ``kind``; yields the seconds to wait between steps."""
    if kind == "leak":
        yield from _keep(mb, secs, 64 * 1024)
    elif kind == "bigleak":
        yield from _keep(mb, secs, 256 * 1024)
    elif kind == "fragment":
        workload.fragment(int(mb), threads=2, keep_every=20, seed=seed)
        yield secs
    elif kind == "spike":
        yield from _spike(mb, secs)
    elif kind == "poison" or (kind == "runaway" and attempt == 1):
        yield from _grow(mb, CAP_MB, hold=60.0)
    else:
        sum(i * i for i in range(20_000 + seed % 1000))
        yield secs


def _keep(mb: float, secs: float, chunk: int) -> Iterator[float]:
    """Keep ``mb`` MiB in ``chunk``-sized pieces, in about 20 steps per second."""
    n = max(1, round(secs / 0.05))
    owed = 0.0
    for _ in range(n):
        owed += mb * MB / n
        while owed >= chunk:
            KEPT.append(b"\x02" * chunk)
            owed -= chunk
        yield secs / n
    if owed >= chunk / 2:  # what rounding left, to the nearest piece
        KEPT.append(b"\x02" * chunk)


def _spike(to_mb: float, secs: float) -> Iterator[float]:
    cgroup = Cgroup.of_self()
    now = cgroup.working_set() / MB if cgroup is not None else 0.0
    mb = max(8.0, to_mb - now)
    held = []
    n = max(1, int(mb // 8))
    for _ in range(n):
        held.append(bytearray(b"\x03") * int(mb * MB / n))
        yield secs / 2 / n
    yield secs / 2
    held.clear()


def _grow(rate_mb: float, cap_mb: int, hold: float) -> Iterator[float]:
    """Grow ``rate_mb`` MiB a second in 8 MiB steps up to ``cap_mb``, hold, let go."""
    held = []
    step = 8 * MB
    t0 = time.monotonic()
    for k in range(1, cap_mb // 8 + 1):
        held.append(bytearray(b"\x06") * step)
        due = t0 + k * 8 / rate_mb
        yield max(0.0, due - time.monotonic())
    yield hold
    held.clear()


def run(job_id: str, kind: str, mb: float = 0, secs: float = 0) -> str:
    """The job of every synchronous framework."""
    attempt = started(job_id)
    for wait in steps(kind, mb, secs, attempt, seed=random.randrange(1 << 30)):
        if wait > 0:
            time.sleep(wait)
    finished(job_id)
    return kind
