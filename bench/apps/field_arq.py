"""The arq app of ``bench/field.py``: one coroutine, ``field_job``, guarded by memwarden.

``max_jobs = 4``; arq's defaults otherwise (``retry_jobs``, ``max_tries`` 5 > the 3 kills of
a poison job, ``job_timeout`` 300 s). memwarden's settings come from ``MEMWARDEN_*``.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any
from urllib.parse import urlparse

import field_jobs
from arq.connections import RedisSettings

import memwarden.arq

_url = urlparse(field_jobs.REDIS_URL)


async def field_job(
    ctx: dict[str, Any], job_id: str, kind: str, mb: float = 0, secs: float = 0
) -> str:
    attempt = field_jobs.started(job_id)
    for wait in field_jobs.steps(kind, mb, secs, attempt, seed=random.randrange(1 << 30)):
        await asyncio.sleep(wait)
    field_jobs.finished(job_id)
    return kind


class WorkerSettings:
    functions = [field_job]
    queue_name = os.environ.get("FIELD_QUEUE", "mw-field")
    redis_settings = RedisSettings(
        host=_url.hostname or "127.0.0.1",
        port=_url.port or 6379,
        database=int((_url.path or "/0").lstrip("/") or 0),
    )
    max_jobs = 4


memwarden.arq.guard(WorkerSettings)
