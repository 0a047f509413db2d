"""The Celery app of ``bench/quota.py``: one task, a fixed mix of real memory behaviour.

Kinds (chosen by the bench, reproducibly): ``light`` (a little CPU), ``fragment`` (several
threads allocate and free mixed-size buffers: the glibc stair-step that stays in RSS until
``malloc_trim``), ``grow`` (grows a lot in the middle of the job, then lets go).

Every completion is recorded in Redis under the run's prefix (``BENCH_PREFIX``): the set of
done ids (lost = enqueued − done), a completion counter (duplicates = counter − done) and the
time of the last one. Worker and pool-child starts are recorded too (restarts, recycles), and
the cgroup's working set as the first worker starts, before its pool forks.
``BENCH_GUARD``: empty (no guard), ``reclaim`` or ``noreclaim`` (``memwarden.celery.guard``).
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery, signals

from memwarden import workload
from memwarden.gauges.cgroup import Cgroup

MB = 1024 * 1024
BROKER = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/9")
PREFIX = os.environ.get("BENCH_PREFIX", "memwarden-bench")
QUEUE = f"{PREFIX}:queue"

app = Celery("bench_celery", broker=BROKER)
app.conf.update(
    # The settings that let a killed task come back (README, "no job lost").
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
_redis = redis.Redis.from_url(BROKER)

GUARD = os.environ.get("BENCH_GUARD", "")
if GUARD:
    from memwarden.celery import guard

    guard(app, reclaim=GUARD == "reclaim")


@signals.worker_init.connect
def _worker_started(**_: object) -> None:
    _redis.incr(f"{PREFIX}:workers")
    cgroup = Cgroup.of_self()
    if cgroup is not None:  # what the worker holds before its pool forks (the guard's base)
        _redis.set(f"{PREFIX}:base", cgroup.working_set(), nx=True)


@signals.worker_ready.connect
def _worker_ready(**_: object) -> None:
    _redis.set(f"{PREFIX}:ready", os.getpid())


@signals.worker_process_init.connect
def _child_started(**_: object) -> None:
    _redis.incr(f"{PREFIX}:children")


def grow(mb: int, step_mb: int = 8, hold_s: float = 0.3) -> int:
    """Grow by ``mb`` MiB in ``step_mb`` steps over about a second, hold, let go."""
    held = []
    for _ in range(max(1, mb // step_mb)):
        held.append(bytearray(b"\x05") * (step_mb * MB))
        time.sleep(0.02)
    time.sleep(hold_s)
    size = sum(len(b) for b in held)
    held.clear()
    return size


@app.task(name="bench.job", bind=True)
def job(self: object, kind: str, mb: int, seed: int) -> str:
    if kind == "fragment":
        # Keeps 1 buffer in 100 for good: the slivers pin pages all over the heap, so RSS
        # climbs in steps much faster than the data kept (glibc's arena stair-step).
        workload.fragment(mb=mb, threads=4, keep_every=100, seed=seed)
    elif kind == "grow":
        grow(mb)
    else:
        sum(i * i for i in range(20_000 + seed % 1000))
    task_id = self.request.id  # type: ignore[attr-defined]
    pipe = _redis.pipeline()
    pipe.sadd(f"{PREFIX}:done", task_id)
    pipe.incr(f"{PREFIX}:completions")
    pipe.set(f"{PREFIX}:last", time.time())
    pipe.execute()
    return kind
