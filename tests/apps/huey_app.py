"""A guarded Huey app for the end-to-end tests: real tasks that really grow memory.

Configured by the environment: ``HUEY_TEST_NAME`` (queue name), ``HUEY_TEST_REDIS`` (Redis
URL), and the ``MEMWARDEN_*`` settings. Every finished task counts itself in the hash
``{name}:done`` (field: the task's number), so the test can prove nothing was lost.
"""

from __future__ import annotations

import os
import time

import redis
from huey import RedisHuey

import memwarden.huey
from memwarden import workload

NAME = os.environ.get("HUEY_TEST_NAME", "memwarden-huey")
URL = os.environ.get("HUEY_TEST_REDIS", "redis://127.0.0.1:6379/5")

huey = RedisHuey(NAME, url=URL, results=False, read_timeout=0.2)
guard = memwarden.huey.guard(huey)
counts = redis.Redis.from_url(URL)


def done(n: int) -> None:
    counts.hincrby(f"{NAME}:done", str(n), 1)


@huey.task()
def work(n: int, leak_mb: float = 0.0) -> None:
    """A small job; some keep ``leak_mb`` MiB for good (real growth of this worker)."""
    if leak_mb:
        workload.leak(leak_mb)
    done(n)


@huey.task()
def hog(n: int, mb: int, first_only: bool = False, hold: float = 15.0) -> None:
    """Hold ``mb`` MiB for ``hold`` seconds (a mid-job hard-limit breach). With
    ``first_only`` only the first attempt is big: the re-enqueued run completes."""
    attempt = counts.hincrby(f"{NAME}:attempts", str(n), 1)
    if not first_only or attempt == 1:
        buf = bytearray(b"\x05") * (mb * workload.MB)
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline:
            time.sleep(0.05)
        del buf
    done(n)


@huey.task()
def nap(n: int, seconds: float) -> None:
    """A slow job, to be interrupted half-way."""
    counts.hincrby(f"{NAME}:attempts", str(n), 1)
    time.sleep(seconds)
    done(n)
