"""The Huey app of ``bench/field.py``: one task, ``field_job``, guarded by memwarden.

A ``RedisHuey`` named by the bench's run (``FIELD_QUEUE``), results off, Huey's defaults
otherwise. memwarden's settings come from ``MEMWARDEN_*``.
"""

from __future__ import annotations

import os

import field_jobs
from huey import RedisHuey  # type: ignore[import-untyped]

import memwarden.huey

huey = RedisHuey(os.environ.get("FIELD_QUEUE", "mw-field"), url=field_jobs.REDIS_URL, results=False)
memwarden.huey.guard(huey)


@huey.task(name="field_job")
def field_job(job_id: str, kind: str, mb: float = 0, secs: float = 0) -> None:
    field_jobs.run(job_id, kind, mb, secs)
