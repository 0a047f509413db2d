"""A guarded Procrastinate app for the end-to-end tests: real jobs that really grow memory.

Configured by the environment: ``MWT_PG_DSN`` (the test's own database) and the
``MEMWARDEN_*`` settings. Every job counts its runs and its completions in the table
``mwt_jobs`` (by the job's number), so the test can prove nothing was lost.
"""

from __future__ import annotations

import asyncio
import os

import psycopg
from procrastinate import App, PsycopgConnector

import memwarden.procrastinate

DSN = os.environ.get("MWT_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")

app = App(
    connector=PsycopgConnector(conninfo=DSN),
    worker_defaults={
        "concurrency": 4,
        "fetch_job_polling_interval": 0.5,
        "update_heartbeat_interval": 1.0,
        "stalled_worker_timeout": 4.0,
    },
)


async def _count(n: int, column: str) -> int:
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        cur = await conn.execute(
            f"INSERT INTO mwt_jobs (n, {column}) VALUES (%s, 1) ON CONFLICT (n)"
            f" DO UPDATE SET {column} = mwt_jobs.{column} + 1 RETURNING {column}",
            (n,),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def _released(n: int) -> bool:
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        cur = await conn.execute("SELECT released FROM mwt_jobs WHERE n = %s", (n,))
        row = await cur.fetchone()
        return bool(row and row[0])


@app.task(name="nap")
async def nap(n: int, seconds: float) -> None:
    """A slow job, to be cut short."""
    await _count(n, "runs")
    await asyncio.sleep(seconds)
    await _count(n, "done")


@app.task(name="hog")
async def hog(n: int, mb: int, first_only: bool = False, rate: float = 0) -> None:
    """Hold ``mb`` MiB for 15 s (a mid-job hard-limit breach), taken at once or at ``rate``
    MiB/s. With ``first_only`` only the first run is big: the run after the kill completes."""
    if await _count(n, "runs") == 1 or not first_only:
        held = []
        for _ in range(mb // 8):
            held.append(bytearray(b"\x05") * (8 * 1024 * 1024))
            if rate:
                await asyncio.sleep(8 / rate)
        await asyncio.sleep(15)
        del held
    await _count(n, "done")


@app.task(name="big")
async def big(n: int, mb: int) -> None:
    """Hold ``mb`` MiB until the test sets ``released`` (60 s at most), then let go."""
    await _count(n, "runs")
    buf = bytearray(b"\x06") * (mb * 1024 * 1024)
    for _ in range(600):
        if await _released(n):
            break
        await asyncio.sleep(0.1)
    del buf
    await _count(n, "done")


memwarden.procrastinate.guard(app)
