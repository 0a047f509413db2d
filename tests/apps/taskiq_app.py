"""A guarded taskiq app for the end-to-end tests: real tasks that really grow memory.

Configured by the environment: ``TASKIQ_TEST_QUEUE`` (stream or list name),
``TASKIQ_TEST_BROKER`` (``stream``: RedisStreamBroker, the default; ``list``:
ListQueueBroker) and the ``MEMWARDEN_*`` settings. Every task counts itself in the hashes
``{queue}:attempts`` / ``{queue}:done`` (field: the task's number).
"""

from __future__ import annotations

import asyncio
import os
import time

import redis
from taskiq_redis import ListQueueBroker, RedisStreamBroker

import memwarden.taskiq
from memwarden import workload

QUEUE = os.environ.get("TASKIQ_TEST_QUEUE", "memwarden-taskiq")
URL = os.environ.get("TASKIQ_TEST_URL", "redis://127.0.0.1:6379/12")
r = redis.Redis.from_url(URL)

if os.environ.get("TASKIQ_TEST_BROKER", "stream") == "list":
    broker: ListQueueBroker | RedisStreamBroker = ListQueueBroker(URL, queue_name=QUEUE)
else:
    broker = RedisStreamBroker(URL, queue_name=QUEUE, consumer_id="0")
broker.add_middlewares(memwarden.taskiq.MemoryWarden())


def attempt(n: int) -> int:
    return int(r.hincrby(f"{QUEUE}:attempts", str(n), 1))


def done(n: int) -> None:
    r.hincrby(f"{QUEUE}:done", str(n), 1)


@broker.task(task_name="hog")
async def hog(n: int, mb: int, first_only: bool = False) -> None:
    """Hold ``mb`` MiB for 15 s (a mid-task hard-limit breach). With ``first_only`` only the
    first attempt is big: the run after the kill completes."""
    if attempt(n) == 1 or not first_only:
        buf = bytearray(b"\x05") * (mb * workload.MB)
        await asyncio.sleep(15)
        del buf
    done(n)


@broker.task(task_name="big")
async def big(n: int, mb: int, rate: float = 100.0) -> None:
    """Take ``mb`` MiB at ``rate`` MiB/s, say so (``{queue}:peaked``), hold them until the
    test sets ``{queue}:release:{n}`` (or 30 s have passed), free them."""
    attempt(n)
    held: list[bytes] = []
    t0 = time.monotonic()
    for i in range(mb):
        held.append(b"\x06" * workload.MB)
        await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
    r.hset(f"{QUEUE}:peaked", str(n), time.time())
    deadline = time.monotonic() + 30
    while not r.exists(f"{QUEUE}:release:{n}") and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    del held
    done(n)


@broker.task(task_name="light")
async def light(n: int) -> None:
    """A small task that says when it started (``{queue}:started``)."""
    r.hset(f"{QUEUE}:started", str(n), time.time())
    attempt(n)
    done(n)


@broker.task(task_name="leaky")
async def leaky(n: int, mb: float, secs: float) -> None:
    """``secs`` of I/O, then keep ``mb`` MiB for good (a slow leak)."""
    attempt(n)
    await asyncio.sleep(secs)
    workload.leak(mb)
    done(n)
