"""Harness for memwarden's arq tests in memory cgroups: the environment, enqueueing, the
journal and the counts the jobs keep in Redis."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from arq.connections import RedisSettings, create_pool
from arq.constants import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)

from apps.harness import delete_keys, redis_counts, worker_env
from apps.harness import journal as journal  # the tests' import

APPS = Path(__file__).resolve().parent
DB = 6  # arq's Redis DB in this project's tests
URL = f"redis://127.0.0.1:6379/{DB}"
ARQ_WORKER = [str(Path(sys.executable).with_name("arq")), "arq_app.WorkerSettings"]
#: Job ids enqueued on each test queue: arq's keys of a job do not name its queue.
ENQUEUED: dict[str, list[str]] = {}


@contextmanager
def arq_env(tmp_path: Path, **settings: str) -> Iterator[dict[str, str]]:
    """A worker's environment (no MEMWARDEN_* but ``settings``, the journal and the state
    dir) on a fresh queue; every key naming it or one of its jobs is deleted afterwards."""
    queue = f"mw-arq-{uuid.uuid4().hex[:10]}"
    try:
        yield worker_env(tmp_path, [APPS], ARQ_TEST_QUEUE=queue, ARQ_TEST_DB=str(DB), **settings)
    finally:
        delete_keys(URL, f"*{queue}*")
        r = redis.Redis.from_url(URL)
        kinds = (job_key_prefix, retry_key_prefix, result_key_prefix, in_progress_key_prefix)
        for job_id in ENQUEUED.pop(queue, []):
            r.delete(*(prefix + job_id for prefix in kinds))


def enqueue(env: dict[str, str], *jobs: tuple[Any, ...]) -> list[str]:
    """Enqueue ``(function, *args)`` jobs on the env's queue; returns their ids."""

    async def go() -> list[str]:
        pool = await create_pool(
            RedisSettings(host="127.0.0.1", port=6379, database=DB),
            default_queue_name=env["ARQ_TEST_QUEUE"],
        )
        try:
            ids = []
            for fn, *args in jobs:
                job = await pool.enqueue_job(fn, *args)
                assert job is not None
                ids.append(job.job_id)
            ENQUEUED.setdefault(env["ARQ_TEST_QUEUE"], []).extend(ids)
            return ids
        finally:
            await pool.aclose()

    return asyncio.run(go())


def counts(env: dict[str, str], what: str) -> dict[int, float]:
    """The hash ``{queue}:{what}`` the jobs keep (done, attempts, started, …), by job."""
    return redis_counts(URL, f"{env['ARQ_TEST_QUEUE']}:{what}")
