"""Jobs and a worker for memwarden's RQ end-to-end tests, run by the real ``rq worker`` CLI.

One job function, ``mw_job(prefix, kind, mb)``. Every run adds one to ``{prefix}:runs`` and
every completion to ``{prefix}:done`` (hashes keyed by job id); each run also records which
process ran it (``{prefix}:pids``) and, for hogs, that it got to its end (``{prefix}:ended``).

Kinds: ``light``; ``fragment`` (glibc fragmentation of ``mb`` MiB, held a moment so the
watchdog sees it); ``leak`` (keeps ``mb`` MiB for good); ``hog`` (keeps ``mb`` MiB, then waits
up to a minute to be killed); ``hog_once`` (a hog on its first run only, light after);
``leak_until_restart`` (keeps ``mb`` MiB, then holds until the journal has a ``restart``).

``ParentGrowsWorker``: a ``memwarden.rq.Worker`` whose parent process keeps
``MWT_PARENT_LEAK_MB`` MiB after every ``MWT_PARENT_LEAK_EVERY`` jobs — the parent that
accumulates memory and inflates every horse it forks.
"""

from __future__ import annotations

import os
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
    elif kind == "hog" or (kind == "hog_once" and runs == 1):
        held = bytearray(b"\x05") * (mb * MB)
        time.sleep(60)  # the watchdog must kill us long before this ends
        r.hincrby(f"{prefix}:ended", job_id, 1)
        del held
    r.hincrby(f"{prefix}:done", job_id, 1)
    return kind


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

    def execute_job(self, job: Any, queue: Any) -> None:
        super().execute_job(job, queue)
        self._jobs_seen += 1
        every = int(os.environ.get("MWT_PARENT_LEAK_EVERY", "0"))
        if every and self._jobs_seen % every == 0:
            workload.leak(float(os.environ.get("MWT_PARENT_LEAK_MB", "0")))
