"""A guarded arq app for the end-to-end tests: real jobs that really grow memory.

Configured by the environment: ``ARQ_TEST_QUEUE`` (queue name), ``ARQ_TEST_DB`` (Redis
database) and the ``MEMWARDEN_*`` settings. Every finished job counts itself in the hash
``{queue}:done`` (field: the job's number), so the test can prove nothing was lost.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from arq.connections import RedisSettings

import memwarden.arq
from memwarden import workload

QUEUE = os.environ.get("ARQ_TEST_QUEUE", "memwarden-arq")
REDIS = RedisSettings(host="127.0.0.1", port=6379, database=int(os.environ.get("ARQ_TEST_DB", "6")))


async def done(ctx: dict[str, Any], n: int) -> None:
    await ctx["redis"].hincrby(f"{QUEUE}:done", str(n), 1)


async def attempt(ctx: dict[str, Any], n: int) -> int:
    return int(await ctx["redis"].hincrby(f"{QUEUE}:attempts", str(n), 1))


async def work(ctx: dict[str, Any], n: int, leak_mb: float = 0.0) -> None:
    """A small job; some keep ``leak_mb`` MiB for good (real growth of this worker)."""
    await attempt(ctx, n)
    if leak_mb:
        workload.leak(leak_mb)
    await asyncio.sleep(0.005)
    await done(ctx, n)


async def hog(ctx: dict[str, Any], n: int, mb: int, first_only: bool = False) -> None:
    """Hold ``mb`` MiB for 15 s (a mid-job hard-limit breach). With ``first_only`` only the
    first attempt is big: the run after the kill completes."""
    if await attempt(ctx, n) == 1 or not first_only:
        buf = bytearray(b"\x05") * (mb * workload.MB)
        await asyncio.sleep(15)
        del buf
    await done(ctx, n)


async def big(ctx: dict[str, Any], n: int, mb: int, rate: float = 100.0) -> None:
    """Take ``mb`` MiB at ``rate`` MiB/s, say so (``{queue}:peaked``), hold them until the
    test sets ``{queue}:release:{n}`` (or 30 s have passed), free them: a big job that goes
    back down."""
    await attempt(ctx, n)
    held: list[bytes] = []
    t0 = time.monotonic()
    for i in range(mb):
        held.append(b"\x06" * workload.MB)
        await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
    await ctx["redis"].hset(f"{QUEUE}:peaked", str(n), time.time())
    deadline = time.monotonic() + 30
    while not await ctx["redis"].exists(f"{QUEUE}:release:{n}") and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    del held
    await done(ctx, n)


async def keep(ctx: dict[str, Any], n: int, mb: float, io_s: float, big: bool) -> None:
    """``io_s`` seconds of I/O, then keep ``mb`` MiB for good: one big (mmap'd) buffer, or
    small heap pieces."""
    await attempt(ctx, n)
    await asyncio.sleep(io_s)
    if big:
        workload.LEAKED.append(b"\x08" * int(mb * workload.MB))
    else:
        workload.leak(mb)
    await done(ctx, n)


async def light(ctx: dict[str, Any], n: int) -> None:
    """A small job that says when it started (``{queue}:started``)."""
    await ctx["redis"].hset(f"{QUEUE}:started", str(n), time.time())
    await done(ctx, n)


async def nap(ctx: dict[str, Any], n: int, seconds: float) -> None:
    """A slow job, to be cut short."""
    await attempt(ctx, n)
    await asyncio.sleep(seconds)
    await done(ctx, n)


async def user_job_start(ctx: dict[str, Any]) -> None:
    """The app's own hook: memwarden must keep it."""
    await ctx["redis"].incr(f"{QUEUE}:user-hook-start")


async def user_job_end(ctx: dict[str, Any]) -> None:
    """The app's own after-job hook: it lingers 5 s after a ``lingering`` job."""
    await ctx["redis"].incr(f"{QUEUE}:user-hook-end")
    if ctx.get("linger"):
        await asyncio.sleep(5)


async def lingering(ctx: dict[str, Any], n: int) -> None:
    """A small job whose end lingers (the app's after-job hook takes 5 s for it)."""
    ctx["linger"] = True
    await done(ctx, n)


class WorkerSettings:
    functions = [work, hog, nap, big, light, keep, lingering]
    queue_name = QUEUE
    redis_settings = REDIS
    max_jobs = 4
    poll_delay = 0.05
    job_timeout = 60
    max_tries = 20
    keep_result = 0  # the tests count completions themselves; leave no result keys behind
    on_job_start = user_job_start
    after_job_end = user_job_end


memwarden.arq.guard(WorkerSettings)
