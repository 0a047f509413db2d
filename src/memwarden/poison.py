"""Poison jobs: a job running at K hard kills is quarantined, not retried forever.

Counts live in Redis (``{prefix}:kills:{job_id}``, with a TTL) so they survive the killed
worker and are shared by the fleet. Integrations call :meth:`PoisonJobs.record_kill` from
the warden's ``before_kill`` hook for every job in flight, and :meth:`is_poison` before
running a job (or when re-delivering one) to quarantine it instead.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("memwarden")


class PoisonJobs:
    """Kill counts per job id in Redis; ``kills`` of them make a job poison."""

    def __init__(
        self, redis: Any, kills: int = 3, ttl: float = 7 * 24 * 3600, prefix: str = "memwarden"
    ) -> None:
        self.redis = redis
        self.kills = kills
        self.ttl = int(ttl)
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> PoisonJobs:
        import redis  # the "redis" extra

        return cls(redis.Redis.from_url(url), **kwargs)

    def _key(self, job_id: Any) -> str:
        return f"{self.prefix}:kills:{job_id}"

    def record_kill(self, job_id: Any) -> int:
        """Count one hard kill against ``job_id``; returns its count so far."""
        pipe = self.redis.pipeline()
        pipe.incr(self._key(job_id))
        pipe.expire(self._key(job_id), self.ttl)
        count = int(pipe.execute()[0])
        if count >= self.kills:
            log.error("memwarden: job %s was running at %d hard kills: it is poison", job_id, count)
        return count

    def count(self, job_id: Any) -> int:
        value = self.redis.get(self._key(job_id))
        return int(value) if value else 0

    def is_poison(self, job_id: Any) -> bool:
        return self.count(job_id) >= self.kills

    def forget(self, job_id: Any) -> None:
        self.redis.delete(self._key(job_id))
