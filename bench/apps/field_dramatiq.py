"""The Dramatiq app of ``bench/field.py``: one actor, ``field_job``, guarded by memwarden.

Redis broker with Dramatiq's defaults (heartbeat timeout, maintenance chance, retries), in a
namespace of the bench's run (``FIELD_PREFIX``). memwarden's settings come from
``MEMWARDEN_*``.
"""

from __future__ import annotations

import os

import dramatiq
import field_jobs
from dramatiq.brokers.redis import RedisBroker

from memwarden.dramatiq import MemoryWarden

QUEUE = os.environ.get("FIELD_QUEUE", "mw-field")
broker = RedisBroker(url=field_jobs.REDIS_URL, namespace=field_jobs.PREFIX)
broker.add_middleware(MemoryWarden())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, actor_name="field_job")
def field_job(job_id: str, kind: str, mb: float = 0, secs: float = 0) -> None:
    field_jobs.run(job_id, kind, mb, secs)
