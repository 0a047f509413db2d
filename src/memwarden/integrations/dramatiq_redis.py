"""Dramatiq's Redis broker: what a dead worker held comes back at once, not in minutes.

The Redis broker keeps the messages a worker fetched and has not acked in a set of its own
(``{namespace}:__acks__.{broker_id}.{queue}``); they go back to their queue when the worker
stops cleanly, or when some *maintenance* finds the worker's heartbeat older than
``heartbeat_timeout`` (60 s) — and maintenance runs on ``maintenance_chance`` broker commands
(0.1 %): minutes, on a quiet queue. :class:`Redelivery` makes both bounded:

- :meth:`Redelivery.give_back` (the hard kill): every message this worker holds — running,
  prefetched, cached — goes back to its queue before the SIGKILL, and the worker is marked
  killed.
- :meth:`Redelivery.sweep` (at boot, then every :func:`sweep_period`): refreshes this
  worker's heartbeat (a consumer whose prefetch is full sends none of its own), and gives
  back what dead workers held: those marked killed for ``KILL_SETTLE`` (anything one fetched
  in its last moments), and those whose heartbeat is older than ``heartbeat_timeout``.

The key layout is Dramatiq's (``dispatch.lua``), unchanged since Dramatiq 1.0.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger("memwarden")

__all__ = ["KILL_SETTLE", "Redelivery", "Sweeper", "sweep_period"]

#: A worker marked killed is dead this long after (ms): the kill follows the mark within the
#: reload's acknowledgement wait (2 s).
KILL_SETTLE = 5000

#: The bounds of the sweep period (s).
MIN_SWEEP, MAX_SWEEP = 0.2, 5.0

# ARGV: namespace, now (ms), heartbeat timeout (ms), settle (ms), own id, mode ("kill" or
# "sweep"), the number of queues, the queues.
_SCRIPT = """
local ns, now = ARGV[1], tonumber(ARGV[2])
local timeout, settle, own, mode = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
local queues = {}
for i = 1, tonumber(ARGV[7]) do queues[i] = ARGV[7 + i] end
local heartbeats = ns .. ":__heartbeats__"
local killed = ns .. ":memwarden:killed"

local function give_back(worker)
  local moved = 0
  for _, q in ipairs(queues) do
    local acks = ns .. ":__acks__." .. worker .. "." .. q
    for _, id in ipairs(redis.call("smembers", acks)) do
      if redis.call("hexists", ns .. ":" .. q .. ".msgs", id) == 1 then
        redis.call("rpush", ns .. ":" .. q, id)
        moved = moved + 1
      end
    end
    redis.call("del", acks)
  end
  return moved
end

if mode == "kill" then
  redis.call("zadd", killed, now, own)
  return give_back(own)
end
redis.call("zadd", heartbeats, now, own)
local moved = 0
for _, worker in ipairs(redis.call("zrangebyscore", killed, 0, now - settle)) do
  moved = moved + give_back(worker)
  redis.call("zrem", killed, worker)
end
for _, worker in ipairs(redis.call("zrangebyscore", heartbeats, 0, now - timeout)) do
  moved = moved + give_back(worker)
end
return moved
"""


def is_redis_broker(broker: Any) -> bool:
    """A Dramatiq Redis broker (``client``, ``namespace``, ``broker_id``, heartbeats)."""
    return all(
        hasattr(broker, name)
        for name in ("client", "namespace", "broker_id", "heartbeat_timeout", "delay_queues")
    )


def sweep_period(heartbeat_timeout_ms: float) -> float:
    """Seconds between two sweeps: a quarter of the heartbeat timeout, within bounds."""
    return min(MAX_SWEEP, max(MIN_SWEEP, heartbeat_timeout_ms / 1000 / 4))


class Redelivery:
    """Gives back to their queues the messages a dead (or dying) worker held."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker
        self.client = broker.client
        self.namespace: str = broker.namespace
        self.script = self.client.register_script(_SCRIPT)

    def queues(self) -> list[str]:
        """Every queue of the broker and its delay queue (their ack sets are per queue)."""
        names = set(self.broker.get_declared_queues()) | set(self.broker.delay_queues)
        names |= {f"{q}.DQ" for q in names if not q.endswith(".DQ")}
        return sorted(names)

    def _run(self, mode: str) -> int:
        queues = self.queues()
        args = [
            self.namespace,
            int(time.time() * 1000),
            int(self.broker.heartbeat_timeout),
            KILL_SETTLE,
            self.broker.broker_id,
            mode,
            len(queues),
            *queues,
        ]
        return int(self.script(args=args))

    def give_back(self) -> int:
        """This worker is about to die: every message it holds goes back to its queue, and
        it is marked killed (a later sweep gives back anything it fetches meanwhile).
        Returns how many went back."""
        return self._run("kill")

    def sweep(self) -> int:
        """Refresh our heartbeat; give back what dead workers held. Returns how many."""
        return self._run("sweep")


class Sweeper:
    """A daemon thread running :meth:`Redelivery.sweep` now and every ``period`` seconds."""

    def __init__(self, redelivery: Redelivery, period: float) -> None:
        self.redelivery = redelivery
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memwarden-sweep", daemon=True)
        self._failing = False

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while True:
            self.once()
            if self._stop.wait(self.period):
                return

    def once(self) -> int:
        """One sweep; errors are logged once per failing stretch and swallowed."""
        try:
            moved = self.redelivery.sweep()
        except Exception:
            if not self._failing:
                log.exception("memwarden: giving back dead workers' messages failed")
            self._failing = True
            return 0
        self._failing = False
        if moved:
            log.warning("memwarden: gave back %d message(s) held by dead workers", moved)
        return moved
