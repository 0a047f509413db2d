"""The Celery app of ``bench/field.py``: one task, ``field.job``, guarded by memwarden.

The settings are the ones the README asks for so that no task is lost (late acks, reject
on worker lost, prefetch 1); everything else is Celery's default (the Redis broker's
visibility timeout stays an hour). memwarden's settings come from ``MEMWARDEN_*``.
"""

from __future__ import annotations

import os

import field_jobs
from celery import Celery  # type: ignore[import-untyped]

import memwarden.celery

app = Celery("field_celery", broker=field_jobs.REDIS_URL)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=os.environ.get("FIELD_QUEUE", "mw-field"),
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=False,  # no pidbox keys left in the bench's Redis
)
memwarden.celery.guard(app)


@app.task(name="field.job")
def job(job_id: str, kind: str, mb: float = 0, secs: float = 0) -> str:
    return field_jobs.run(job_id, kind, mb, secs)
