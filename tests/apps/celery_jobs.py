"""A Celery app for memwarden's end-to-end tests: real tasks that really grow memory.

Configured by env: ``MWT_BROKER`` (Redis or RabbitMQ URL), ``MWT_QUEUE`` (unique per test),
``MWT_RUN`` (prefix of the Redis keys where tasks record completions). Results and
completion marks live in Redis DB 1.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

import memwarden.celery
from memwarden import workload

BACKEND = "redis://127.0.0.1:6379/1"
RUN = os.environ.get("MWT_RUN", "mwt")
QUEUE = os.environ.get("MWT_QUEUE", "mwt")
MB = 1024 * 1024

app = Celery("celery_jobs", broker=os.environ.get("MWT_BROKER", BACKEND), backend=BACKEND)
app.conf.update(
    # The settings that make a killed task come back (MWT_UNSAFE=1: Celery's defaults).
    task_acks_late=not os.environ.get("MWT_UNSAFE"),
    task_reject_on_worker_lost=not os.environ.get("MWT_UNSAFE"),
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=int(os.environ.get("MWT_PREFETCH", "1")),
    result_expires=900,
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=False,
    # A short visibility timeout brings a SIGKILLed worker's tasks back in seconds (the
    # default is an hour); real tasks must finish well inside it or run twice.
    broker_transport_options={"visibility_timeout": 4},
)
if os.environ.get("MWT_GUARD", "1") != "0":
    memwarden.celery.guard(app)
marks = redis.Redis.from_url(BACKEND)


def _where() -> str:
    return f"{os.getpid()}:{os.getppid()}"


@app.task(name="mwt.work", bind=True)
def work(self, kind: str = "", mb: int = 0) -> str:
    """A short job; ``fragment`` leaves glibc fragmentation, ``leak`` keeps memory."""
    if kind == "fragment":
        workload.fragment(mb, threads=2)
    elif kind == "leak":
        workload.leak(mb)
    marks.sadd(f"{RUN}:done", self.request.id)
    return _where()


@app.task(name="mwt.grow", bind=True)
def grow(
    self, first_mb: int, later_mb: int, step_mb: int = 8, pause: float = 0.05, hold: float = 0
) -> str:
    """Grows step by step: to ``first_mb`` on its first delivery (past the hard limit), and
    holds it ``hold`` seconds; to ``later_mb`` after that. Records each attempt's start and
    end."""
    key = f"{RUN}:grow:{self.request.id}"
    attempt = marks.incr(f"{key}:attempts")
    marks.hset(f"{key}:started", attempt, _where())
    target = first_mb if attempt == 1 else later_mb
    held = []
    for _ in range(0, target, step_mb):
        held.append(bytearray(b"\x05") * (step_mb * MB))
        time.sleep(pause)
    if attempt == 1:
        time.sleep(hold)
    marks.hset(f"{key}:finished", attempt, _where())
    marks.sadd(f"{RUN}:done", self.request.id)
    return _where()


@app.task(name="mwt.poison", bind=True)
def poison(self, mb: int, step_mb: int = 8, pause: float = 0.05) -> str:
    """Always grows to ``mb``: past the hard limit on every delivery."""
    marks.incr(f"{RUN}:poison:{self.request.id}:runs")
    held = [bytearray(b"\x06") * (step_mb * MB)]
    for _ in range(0, mb, step_mb):
        held.append(bytearray(b"\x06") * (step_mb * MB))
        time.sleep(pause)
    marks.sadd(f"{RUN}:done", self.request.id)
    return _where()
