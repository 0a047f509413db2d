"""Taskiq on Redis (taskiq-redis): which broker settings can lose a task, and the consumers
of a ``RedisStreamBroker`` group — this worker's lease and notes, what a consumer holds given
back to the stream, the consumers of dead workers rescued.

Keys, under ``memwarden:taskiq:{queue}``: ``lease:{consumer}`` (``host:pid``, :data:`LEASE`
seconds, renewed), ``running`` (task id -> ``consumer<TAB>task name``), ``kills:{task_id}``
(:class:`~memwarden.poison.PoisonJobs`), ``quarantine``, ``killed`` (a ListQueueBroker's
messages set aside at a kill).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any, cast

import redis
from taskiq.abc.broker import AsyncBroker

from memwarden.gauges.proc import alive

log = logging.getLogger("memwarden")

__all__ = [
    "LEASE",
    "RESCUE_EVERY",
    "StreamConsumers",
    "broker_kind",
    "loss_notes",
    "no_loss_problems",
    "redelivery_note",
]

#: A worker's lease on its stream consumer (s), renewed every third of it; a consumer with
#: no lease (or one of a process gone from this host) is dead.
LEASE = 10.0
#: How often a worker looks for stream consumers of dead workers (s).
RESCUE_EVERY = 5.0
#: A RedisStreamBroker autoclaim lock left with no expiry by a killed worker expires this
#: long after (ms): taskiq-redis takes it with no timeout, and a lock never released stops
#: every worker from reclaiming the messages of dead ones.
AUTOCLAIM_LOCK_TTL = 5000

#: Add again, then acknowledge, every pending entry of consumer ARGV[2] in group ARGV[1] of
#: stream KEYS[1] (at most ARGV[3]); returns how many went back.
GIVE_BACK_LUA = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', ARGV[3], ARGV[2])
local n = 0
for _, entry in ipairs(pending) do
  local id = entry[1]
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if #found > 0 then
    redis.call('XADD', KEYS[1], '*', unpack(found[1][2]))
    n = n + 1
  end
  redis.call('XACK', KEYS[1], ARGV[1], id)
end
return n
"""


def broker_kind(broker: AsyncBroker) -> str:
    """``stream``, ``list`` or ``other``: which taskiq-redis broker this is."""
    names = {c.__name__ for c in type(broker).__mro__}
    if "RedisStreamBroker" in names:
        return "stream"
    if "ListQueueBroker" in names:
        return "list"
    return "other"


def no_loss_problems(broker: AsyncBroker, ack_type: str | None = None) -> list[str]:
    """The broker settings (and worker ``--ack-type``) that can lose a task."""
    kind = broker_kind(broker)
    if kind == "list":
        return [
            "ListQueueBroker takes a message off Redis as it reads it: a task is put back "
            "when memwarden kills the worker, but lost when anything else does (the kernel's "
            "OOM killer, a crash); use taskiq_redis.RedisStreamBroker"
        ]
    if kind != "stream":
        return [
            f"{type(broker).__name__}: memwarden counts poison kills but cannot put a "
            f"message back; whether a killed task comes back is the broker's"
        ]
    problems = []
    if (ack_type or "when_saved") == "when_received":
        problems.append(
            "--ack-type when_received acknowledges a message before its task runs: a "
            "task running at a kill memwarden does not make is lost; use when_saved"
        )
    if str(getattr(broker, "consumer_id", "$")) == "$":
        problems.append(
            "RedisStreamBroker(consumer_id='$') makes its group at the first worker's "
            "start: tasks sent before that are never read; pass consumer_id='0'"
        )
    return problems


def redelivery_note(broker: AsyncBroker) -> str | None:
    """When the tasks of a dead worker come back (RedisStreamBroker)."""
    if broker_kind(broker) != "stream":
        return None
    idle = float(getattr(broker, "idle_timeout", 0)) / 1000
    return (
        f"RedisStreamBroker: tasks held by a worker memwarden kills go back at once; by one "
        f"that dies otherwise, within {LEASE + RESCUE_EVERY:g} s while a guarded worker "
        f"runs (else taskiq's own idle_timeout, {idle:g} s: keep it above your longest "
        f"task, or a task still running is run twice)"
    )


def loss_notes(broker: AsyncBroker, ack_type: str | None = None) -> list[str]:
    """What can lose a task, then when a dead worker's tasks come back."""
    note = redelivery_note(broker)
    return no_loss_problems(broker, ack_type) + ([note] if note else [])


class StreamConsumers:
    """The consumers of one queue's ``RedisStreamBroker`` group, as this worker's
    ``consumer`` sees them (``client``: a plain Redis client, any thread)."""

    def __init__(self, client: redis.Redis, queue: str, group: str, consumer: str) -> None:
        self.redis, self.queue, self.group, self.consumer = client, queue, group, consumer
        self.running_key = f"memwarden:taskiq:{queue}:running"

    def lease_key(self, consumer: str) -> str:
        return f"memwarden:taskiq:{self.queue}:lease:{consumer}"

    def renew(self) -> None:
        """This worker's lease, for :data:`LEASE` seconds more."""
        here = f"{socket.gethostname()}:{os.getpid()}"
        self.redis.set(self.lease_key(self.consumer), here, px=int(LEASE * 1000))

    def started(self, task_id: str, name: str) -> None:
        self.redis.hset(self.running_key, task_id, f"{self.consumer}\t{name}")

    def ended(self, *task_ids: str) -> None:
        if task_ids:
            self.redis.hdel(self.running_key, *task_ids)

    def let_go(self) -> None:
        """No lease from now (a kill is next): the next worker that looks takes what a read
        under way here brings."""
        self.redis.delete(self.lease_key(self.consumer))

    def leave(self) -> None:
        """A clean stop: out of the group (nothing left pending), no lease."""
        self.redis.xgroup_delconsumer(self.queue, self.group, self.consumer)
        self.let_go()

    def give_back(self, consumer: str | None = None) -> int:
        """Every entry pending for ``consumer`` (default: ours) added to the stream again
        and acknowledged: any worker reads it next. Returns how many."""
        args = (self.group, consumer or self.consumer, "10000")
        return int(cast("int", self.redis.eval(GIVE_BACK_LUA, 1, self.queue, *args)))

    def expire_autoclaim_lock(self) -> None:
        """An autoclaim lock with no expiry (its holder was killed) expires in a moment."""
        key = f"autoclaim:{self.group}:{self.queue}"
        if self.redis.ttl(key) == -1:
            self.redis.pexpire(key, AUTOCLAIM_LOCK_TTL)

    def dead(self, consumer: str) -> bool:
        """No lease, or a lease of a process of this host that is gone."""
        lease = self.redis.get(self.lease_key(consumer))
        if lease is None:
            return True
        host, _, pid = _text(lease).rpartition(":")
        return host == socket.gethostname() and pid.isdigit() and not alive(int(pid))

    def rescue(self, count_kill: Callable[[str, str], None]) -> int:
        """The consumers of dead workers: ``count_kill(task_id, name)`` for each task noted
        running there, every entry they held back on the stream, the consumer out of the
        group. Returns how many entries went back."""
        try:
            consumers = cast(
                "list[dict[str, Any]]", self.redis.xinfo_consumers(self.queue, self.group)
            )
        except redis.ResponseError:
            return 0  # no stream or group yet
        running = cast("dict[bytes, bytes]", self.redis.hgetall(self.running_key))
        total = 0
        for info in consumers:
            name = _text(info.get("name"))
            if name == self.consumer or not self.dead(name):
                continue
            held = {
                _text(t): _text(note).partition("\t")[2]
                for t, note in running.items()
                if _text(note).partition("\t")[0] == name
            }
            if not int(info.get("pending", 0)) and not held:
                continue
            if not self.redis.set(f"{self.lease_key(name)}:rescue", 1, nx=True, ex=30):
                continue  # another worker is at it
            for task_id, task_name in held.items():
                count_kill(task_id, task_name)
            self.ended(*held)
            n = self.give_back(name)
            self.redis.xgroup_delconsumer(self.queue, self.group, name)
            log.warning("memwarden: taskiq consumer %s is gone: %d messages back", name, n)
            total += n
        return total


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
