"""A guarded Huey app for the end-to-end tests: real tasks that really grow memory.

Configured by the environment: ``HUEY_TEST_NAME`` (queue name), ``HUEY_TEST_REDIS`` (Redis
URL), ``HUEY_TEST_READ_TIMEOUT`` (an idle fetch's wait, default 0.2 s) and the
``MEMWARDEN_*`` settings. Every finished task counts itself in the hash ``{name}:done``
(field: the task's number), so the test can prove nothing was lost.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from huey import RedisHuey

import memwarden.huey
from memwarden import workload

NAME = os.environ.get("HUEY_TEST_NAME", "memwarden-huey")
URL = os.environ.get("HUEY_TEST_REDIS", "redis://127.0.0.1:6379/5")

#: How long an idle worker's fetch blocks in Redis (BLMOVE); a test may make it long.
READ_TIMEOUT = float(os.environ.get("HUEY_TEST_READ_TIMEOUT", "0.2"))
huey = RedisHuey(NAME, url=URL, results=False, read_timeout=READ_TIMEOUT)
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
def big(n: int, mb: int, rate: float = 100.0) -> None:
    """Take ``mb`` MiB at ``rate`` MiB/s, say so (``{name}:peaked``), hold them until the
    test sets ``{name}:release:{n}`` (or 30 s have passed), free them and say when
    (``{name}:ended``): a big task that goes back down."""
    counts.hincrby(f"{NAME}:attempts", str(n), 1)
    held = paced(mb, rate)
    counts.hset(f"{NAME}:peaked", str(n), time.time())
    deadline = time.monotonic() + 30
    while not counts.exists(f"{NAME}:release:{n}") and time.monotonic() < deadline:
        time.sleep(0.02)
    del held
    counts.hset(f"{NAME}:ended", str(n), time.time())
    done(n)


@huey.task()
def keep(n: int, mb: float, io_s: float, big: bool) -> None:
    """``io_s`` seconds of I/O, then keep ``mb`` MiB for good: one big (mmap'd) buffer, or
    small heap pieces. Counts its attempts and its completion."""
    counts.hincrby(f"{NAME}:attempts", str(n), 1)
    time.sleep(io_s)
    if big:
        workload.LEAKED.append(b"\x08" * int(mb * workload.MB))
    else:
        workload.leak(mb)
    done(n)


@huey.task()
def lingering(n: int) -> None:
    """A small task whose end lingers: the app's own post_execute hook takes 5 s for it."""
    done(n)


@huey.post_execute()
def linger(task: Any, value: Any, exception: BaseException | None) -> None:
    """The app's own after-task hook (after memwarden's): slow for ``lingering`` tasks."""
    if task.name == "lingering":
        time.sleep(5)


@huey.task()
def light(n: int) -> None:
    """A small task that says when it started (``{name}:started``)."""
    counts.hset(f"{NAME}:started", str(n), time.time())
    done(n)


def paced(mb: int, rate: float) -> list[bytes]:
    """``mb`` MiB in 1 MiB pieces (each page touched) at ``rate`` MiB/s."""
    kept: list[bytes] = []
    t0 = time.monotonic()
    for i in range(mb):
        kept.append(b"\x06" * workload.MB)
        ahead = t0 + (i + 1) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    return kept


@huey.task()
def nap(n: int, seconds: float) -> None:
    """A slow job, to be interrupted half-way."""
    counts.hincrby(f"{NAME}:attempts", str(n), 1)
    time.sleep(seconds)
    done(n)
