"""A Celery app for memwarden's end-to-end tests: real tasks that really grow memory.

Configured by env: ``MWT_BROKER`` (Redis or RabbitMQ URL), ``MWT_QUEUE`` (unique per test),
``MWT_RUN`` (prefix of the Redis keys where tasks record completions), ``MWT_VISIBILITY``
(the Redis visibility timeout, s; ``default``: Celery's hour). Results and completion marks
live in Redis DB 1.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, signals

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
)
VISIBILITY = os.environ.get("MWT_VISIBILITY", "4")
if VISIBILITY != "default":
    # A short visibility timeout brings a SIGKILLed worker's tasks back in seconds (the
    # default is an hour); real tasks must finish well inside it or run twice.
    # Kombu's restore takes a Redis lock that outlives a worker killed holding it by 5
    # minutes (``unacked_mutex_expire``): the next worker could not restore for that long.
    app.conf.broker_transport_options = {
        "visibility_timeout": float(VISIBILITY),
        "unacked_mutex_expire": max(2 * float(VISIBILITY), 5.0),
    }
if os.environ.get("MWT_GUARD", "1") != "0":
    memwarden.celery.guard(app)
marks = redis.Redis.from_url(BACKEND)


@signals.task_success.connect
def _succeeded(sender: Any = None, **_: Any) -> None:
    """Marks each success once Celery has stored it, by task id and process (connected
    after the guard's receivers)."""
    marks.hset(f"{RUN}:succeeded", f"{sender.request.id}:{os.getpid()}", f"{time.time():.6f}")


@signals.task_received.connect
def _received(request: Any = None, **_: Any) -> None:
    """Marks each receipt of a task by the worker (its consumer fetched it): task id ->
    the receipts' times, space-separated (a redelivery adds one)."""
    if request is not None:
        marks.append(f"{RUN}:received:{request.id}", f"{time.time():.6f} ")


def _where() -> str:
    return f"{os.getpid()}:{os.getppid()}"


@app.task(name="mwt.work", bind=True)
def work(self, kind: str = "", mb: int = 0) -> str:
    """A short job; ``fragment`` leaves glibc fragmentation, ``leak`` keeps memory in small
    (64 KiB, heap) pieces, ``leak_big`` in 1 MiB (mmap'd) ones."""
    if kind == "fragment":
        workload.fragment(mb, threads=2)
    elif kind == "leak":
        workload.leak(mb)
    elif kind == "leak_big":
        workload.leak(mb, chunk=MB)
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


def _wait_for_key(name: str) -> None:
    while not marks.exists(f"{RUN}:{name}"):
        time.sleep(0.02)


@app.task(name="mwt.hold", bind=True)
def hold(self, mb: int = 0) -> str:
    """Records its start, waits for the test's ``grow`` key, holds ``mb`` MiB (one big,
    touched buffer) until the ``release`` key, then frees it and ends."""
    marks.hset(f"{RUN}:started", self.request.id, f"{_where()}:{time.time():.6f}")
    _wait_for_key("grow")
    held = bytearray(b"\x08") * (mb * MB) if mb else None
    _wait_for_key("release")
    del held
    marks.sadd(f"{RUN}:done", self.request.id)
    return _where()


@app.task(name="mwt.wait_key", bind=True)
def wait_key(self, name: str) -> str:
    """Records its start, waits for the test's key ``name``, ends."""
    marks.hset(f"{RUN}:started", self.request.id, f"{_where()}:{time.time():.6f}")
    _wait_for_key(name)
    marks.sadd(f"{RUN}:done", self.request.id)
    return _where()


@app.task(name="mwt.tick", bind=True)
def tick(self, ms: float = 2.0) -> str:
    """A short task: records its start (and counts its runs), sleeps ``ms``, done."""
    marks.hset(f"{RUN}:started", self.request.id, f"{_where()}:{time.time():.6f}")
    marks.hincrby(f"{RUN}:runs", self.request.id)
    time.sleep(ms / 1000)
    marks.sadd(f"{RUN}:done", self.request.id)
    return _where()


@app.task(name="mwt.runaway", bind=True)
def runaway(self, mb: int) -> str:
    """Allocates ``mb`` MiB at memset speed on its first delivery (faster than any reading),
    nothing after."""
    attempt = marks.incr(f"{RUN}:runaway:{self.request.id}:attempts")
    if attempt == 1:
        held = bytearray(b"\x07") * (mb * MB)
        del held
    marks.sadd(f"{RUN}:done", self.request.id)
    return _where()
