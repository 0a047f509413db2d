"""Jobs and a worker for memwarden's RQ end-to-end tests, run by the real ``rq worker`` CLI.

One job function, ``mw_job(prefix, kind, mb)``. Every run adds one to ``{prefix}:runs`` and
every completion to ``{prefix}:done`` (hashes keyed by job id); each run also records which
process ran it (``{prefix}:pids``) and, for hogs, that it got to its end (``{prefix}:ended``).

Kinds: ``light``; ``fragment`` (glibc fragmentation of ``mb`` MiB, held a moment so the
watchdog sees it); ``leak`` (keeps ``mb`` MiB for good); ``hog`` (keeps ``mb`` MiB, then waits
up to a minute to be killed); ``hog_once`` (a hog on its first run only, light after);
``leak_until_restart`` (keeps ``mb`` MiB, then holds until the journal has a ``restart``);
``grow`` (keeps ``mb`` MiB for good, taken at ``MWT_GROW_RATE`` MiB/s, default 100);
``hold`` (takes ``mb`` MiB at that pace, holds them until the journal has a ``pause``
record or 10 s have passed, then frees them: a big job that goes back down); ``hold_for``
(takes ``mb`` MiB at that pace, holds them ``MWT_HOLD_S`` seconds, then frees them);
``keep``/``keep_big`` (``MWT_IO_S`` seconds of I/O, default 0.05, then keeps ``mb`` MiB
for good: as small heap objects, or as one big mmap'd buffer); ``grow_after_end`` (on its
first run, a thread that keeps ``mb`` MiB once the job's status reads finished: memory over
the limit while the worker still finishes a job that ended).

``ParentGrowsWorker``: a ``memwarden.rq.Worker`` whose parent process keeps
``MWT_PARENT_LEAK_MB`` MiB after every ``MWT_PARENT_LEAK_EVERY`` jobs — the parent that
accumulates memory and inflates every horse it forks. With ``MWT_PARENT_KEEP="2,8"`` it
keeps a random 2–8 MiB after every job instead, one job in two as one big buffer.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import Any

import redis
from rq import get_current_job

from memwarden import workload
from memwarden.rq import Worker

MB = 1024 * 1024
_store: redis.Redis | None = None


def store() -> redis.Redis:
    global _store
    if _store is None or _store.connection_pool.pid != os.getpid():
        _store = redis.Redis.from_url(os.environ["MWT_REDIS_URL"])
    return _store


def mw_job(prefix: str, kind: str, mb: int = 0) -> str:
    job = get_current_job()
    job_id = job.id if job is not None else "?"
    r = store()
    runs = int(r.hincrby(f"{prefix}:runs", job_id, 1))
    r.rpush(f"{prefix}:pids:{job_id}", os.getpid())
    if kind == "fragment":
        workload.fragment(mb, threads=4, keep_every=20, seed=runs)
        time.sleep(0.5)
    elif kind == "leak":
        workload.leak(mb)
    elif kind == "leak_until_restart":
        workload.leak(mb)
        wait_for_record("restart")
    elif kind == "grow_after_end" and runs == 1 and job is not None:
        threading.Thread(target=grow_once_finished, args=(job.key, mb), daemon=True).start()
    elif kind in ("keep", "keep_big"):
        time.sleep(float(os.environ.get("MWT_IO_S", "0.05")))
        keep(mb, big=kind == "keep_big")
    elif kind == "grow":
        workload.LEAKED.extend(paced(mb))
    elif kind == "hold_for":
        held = paced(mb)
        time.sleep(float(os.environ.get("MWT_HOLD_S", "5")))
        del held
    elif kind == "hold":
        held = paced(mb)
        wait_for_record("pause", timeout=10)
        del held
    elif kind == "hog" or (kind == "hog_once" and runs == 1):
        held = bytearray(b"\x05") * (mb * MB)
        time.sleep(60)  # the watchdog must kill us long before this ends
        r.hincrby(f"{prefix}:ended", job_id, 1)
        del held
    r.hincrby(f"{prefix}:done", job_id, 1)
    return kind


def grow_once_finished(job_key: str, mb: int) -> None:
    """Once the job reads finished in Redis, keep ``mb`` MiB (the worker dies with them)."""
    deadline = time.monotonic() + 30
    while store().hget(job_key, "status") != b"finished" and time.monotonic() < deadline:
        time.sleep(0.005)
    workload.LEAKED.append(b"\x09" * (mb * MB))


def keep(mb: float, big: bool) -> None:
    """Keep ``mb`` MiB for good: one buffer (mmap'd by malloc) or 64 KiB heap pieces."""
    if big:
        workload.LEAKED.append(b"\x08" * int(mb * MB))
    else:
        workload.leak(mb)


def paced(mb: int) -> list[bytes]:
    """``mb`` MiB in 1 MiB pieces (each page touched) at ``MWT_GROW_RATE`` MiB/s."""
    rate = float(os.environ.get("MWT_GROW_RATE", "100"))
    kept: list[bytes] = []
    t0 = time.monotonic()
    for i in range(mb):
        kept.append(b"\x06" * MB)
        ahead = t0 + (i + 1) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    return kept


def wait_for_record(event: str, timeout: float = 60.0) -> None:
    """Hold the job until the worker's journal has an ``event`` record (or time is up)."""
    needle = f'"event": "{event}"'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(os.environ["MEMWARDEN_JOURNAL"]) as f:
            if needle in f.read():
                return
        time.sleep(0.05)


class ParentGrowsWorker(Worker):
    """A guarded forking worker whose parent keeps memory every few jobs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._jobs_seen = 0
        self._random = random.Random(os.getpid())

    def execute_job(self, job: Any, queue: Any) -> None:
        super().execute_job(job, queue)
        self._jobs_seen += 1
        spread = os.environ.get("MWT_PARENT_KEEP")
        if spread:
            low, high = (float(x) for x in spread.split(","))
            keep(self._random.uniform(low, high), big=self._jobs_seen % 2 == 0)
            return
        every = int(os.environ.get("MWT_PARENT_LEAK_EVERY", "0"))
        if every and self._jobs_seen % every == 0:
            workload.leak(float(os.environ.get("MWT_PARENT_LEAK_MB", "0")))


class StoppedAsItIdlesWorker(Worker):
    """A guarded forking worker whose stop signal (SIGTERM, what a platform sends) lands
    the moment RQ marks it idle after its first job: the horse is reaped, our after-job
    record not yet written."""

    _mw_stop_sent = False

    def set_state(self, state: Any, pipeline: Any = None) -> None:
        super().set_state(state, pipeline)
        if state == "idle" and self._mw_wait[0] and not self._mw_stop_sent:  # horse reaped
            self._mw_stop_sent = True
            os.kill(os.getpid(), signal.SIGTERM)
