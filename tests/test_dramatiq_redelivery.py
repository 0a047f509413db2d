"""Dramatiq's Redis broker: what a dead worker held goes back to its queue, at once.

Real Redis, real ``RedisBroker`` instances (each one a Dramatiq worker identity, as in a
worker process): one fetches messages through its consumer (they sit in its ack set, as
when it runs or prefetches them), then it "dies" and :class:`Redelivery` gives them back.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from apps.dramatiq_harness import REDIS_URL
from conftest import need_service
from memwarden.integrations import dramatiq_redis
from memwarden.integrations.dramatiq_redis import Redelivery, Sweeper, sweep_period


@pytest.fixture
def namespace() -> Iterator[str]:
    need_service("Redis", 6379)
    tag = f"mwt-redeliver-{uuid.uuid4().hex[:8]}"
    yield tag
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{tag}*"))
    if keys:
        client.delete(*keys)
    client.close()


def worker(namespace: str, heartbeat_ms: int = 60_000) -> RedisBroker:
    """A broker as one worker process has it, with Dramatiq's maintenance off: only
    memwarden gives anything back here."""
    broker = RedisBroker(
        url=REDIS_URL,
        namespace=namespace,
        heartbeat_timeout=heartbeat_ms,
        maintenance_chance=0,
    )
    broker.declare_queue("q")
    return broker


def send(broker: RedisBroker, n: int) -> list[str]:
    return [broker.enqueue(dramatiq.Message("q", "a", (i,), {}, {})).message_id for i in range(n)]


def fetch(broker: RedisBroker, n: int) -> list[str]:
    """Fetch ``n`` messages (prefetch ``n``): they are the worker's, unacked."""
    consumer = broker.consume("q", prefetch=n, timeout=100)
    got = []
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        message = next(consumer)
        if message is not None:
            got.append(message.message_id)
    return got


def queued(broker: RedisBroker) -> list[str]:
    raw = broker.client.lrange(f"{broker.namespace}:q", 0, -1)
    data = broker.client.hmget(f"{broker.namespace}:q.msgs", raw) if raw else []
    return [dramatiq.Message.decode(d).message_id for d in data]


def held(broker: RedisBroker) -> set[bytes]:
    return broker.client.smembers(f"{broker.namespace}:__acks__.{broker.broker_id}.q")


def test_a_dying_worker_gives_back_everything_it_holds(namespace: str) -> None:
    dying, other = worker(namespace), worker(namespace)
    sent = send(dying, 5)
    taken = fetch(dying, 3)
    assert taken == sent[:3] and len(held(dying)) == 3

    assert Redelivery(dying).give_back() == 3
    assert held(dying) == set()
    back = queued(other)  # all five back, the three at the end (in no set order)
    assert back[:2] == sent[3:] and sorted(back[2:]) == sorted(sent[:3])
    assert sorted(fetch(other, 5)) == sorted(sent)


def test_what_a_killed_worker_fetched_after_giving_back_comes_back_at_the_next_sweep(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kill follows the give-back within moments; a fetch in between (a consumer
    thread's) is given back by the next sweep of any worker once the kill has settled."""
    dying, other = worker(namespace), worker(namespace)
    sent = send(dying, 4)
    fetch(dying, 2)
    Redelivery(dying).give_back()
    late = fetch(dying, 1)  # its consumer fetched once more before the SIGKILL
    assert late == [sent[2]] and len(held(dying)) == 1

    assert Redelivery(other).sweep() == 0  # not yet: the kill may not have happened
    monkeypatch.setattr(dramatiq_redis, "KILL_SETTLE", 0)
    assert Redelivery(other).sweep() == 1
    assert held(dying) == set()
    assert sorted(queued(other)) == sorted(sent)
    assert Redelivery(other).sweep() == 0  # the mark is gone with it


def test_a_sweep_gives_back_what_workers_with_stale_heartbeats_held(namespace: str) -> None:
    """A worker that died without a word (the kernel's OOM killer, a platform's SIGKILL):
    its heartbeat goes stale, and a sweep gives back what it held, whatever Dramatiq's
    maintenance lottery; the sweeping worker's own heartbeat is kept fresh meanwhile."""
    dead, alive = worker(namespace, heartbeat_ms=500), worker(namespace, heartbeat_ms=500)
    sent = send(dead, 3)
    fetch(dead, 2)
    fetch(alive, 1)  # a live worker's message in hand must stay with it
    sweeper = Sweeper(Redelivery(alive), period=0.1).start()
    try:
        deadline = time.monotonic() + 10
        while held(dead) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held(dead) == set()
        assert sorted(queued(alive)) == sorted(sent[:2])
        assert len(held(alive)) == 1  # its heartbeat was refreshed by the sweeps
    finally:
        sweeper.stop()


def test_sweep_period_is_a_quarter_of_the_heartbeat_timeout_within_bounds() -> None:
    assert sweep_period(60_000) == 5.0
    assert sweep_period(10_000) == 2.5
    assert sweep_period(100) == 0.2
