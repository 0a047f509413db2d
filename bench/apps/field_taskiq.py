"""The Taskiq app of ``bench/field.py``: one coroutine task, ``field_job``, guarded by memwarden.

``taskiq worker field_taskiq:broker --workers 2 --max-async-tasks 2``; RedisStreamBroker
(the taskiq-redis broker that acknowledges a message after its task) with taskiq's
defaults but ``consumer_id="0"`` (a group made at ``$`` never reads what was sent before
the first worker started). memwarden's settings come from ``MEMWARDEN_*``.
"""

from __future__ import annotations

import asyncio
import os
import random

import field_jobs
from taskiq_redis import RedisStreamBroker

import memwarden.taskiq

broker = RedisStreamBroker(
    field_jobs.REDIS_URL, queue_name=os.environ.get("FIELD_QUEUE", "mw-field"), consumer_id="0"
)
broker.add_middlewares(memwarden.taskiq.MemoryWarden())


@broker.task(task_name="field_job")
async def field_job(job_id: str, kind: str, mb: float = 0, secs: float = 0) -> str:
    attempt = field_jobs.started(job_id)
    for wait in field_jobs.steps(kind, mb, secs, attempt, seed=random.randrange(1 << 30)):
        await asyncio.sleep(wait)
    field_jobs.finished(job_id)
    return kind
