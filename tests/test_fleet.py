"""Fleet coordination against a real Redis (DB 7): the K-holder restart lock and its TTL."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import need_service, wait_for
from fleet_worker import Workers
from memwarden import redact, workload
from memwarden.config import Config
from memwarden.coordination import HostLock, Once
from memwarden.fleet import Fleet, FleetLock, Heartbeat, Link, connect, holders_key
from memwarden.fleet import checks as fleet_checks
from memwarden.gauges.proc import self_rss
from memwarden.policy import Action
from memwarden.units import SettingError
from memwarden.warden import Hooks, Warden

HERE = Path(__file__).resolve().parent
URL = "redis://127.0.0.1:6379/7"
DEAD = "redis://127.0.0.1:1/7"  # nothing listens on port 1
MB = 1024 * 1024


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    need_service("Redis", 6379)
    c = redis.Redis.from_url(URL)
    yield c
    c.close()


@pytest.fixture
def fleet(client: redis.Redis) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    for key in client.scan_iter(match=f"memwarden:{name}:*"):
        client.delete(key)
    for key in client.scan_iter(match=f"{name}:*"):
        client.delete(key)


def lock(fleet: str, k: int = 2, ttl: float = 30.0, url: str = URL) -> FleetLock:
    return FleetLock(Link(connect(url), redact.url(url)), fleet, k=k, ttl=ttl)


def server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_at_most_k_hold_and_a_release_lets_the_next_in(fleet):
    a, b, c = lock(fleet), lock(fleet), lock(fleet)
    assert a.try_acquire() and b.try_acquire()
    assert not c.try_acquire()
    assert a.try_acquire()  # re-entrant for its owner, still two holders
    assert not c.try_acquire()
    a.release()
    assert c.try_acquire()
    assert len({a.token, b.token, c.token}) == 3
    b.release()
    c.release()


def test_only_the_owner_can_release(fleet, client):
    a, b = lock(fleet, k=1), lock(fleet, k=1)
    assert a.try_acquire()
    b.held = True  # even a confused non-owner only removes its own token
    b.release()
    assert client.zscore(holders_key(fleet), a.token) is not None
    assert not lock(fleet, k=1).try_acquire()
    a.release()
    assert client.zcard(holders_key(fleet)) == 0


def test_a_live_holder_keeps_its_place_past_the_ttl(fleet, client):
    a = lock(fleet, k=1, ttl=4.0)
    assert a.try_acquire()
    first = client.zscore(holders_key(fleet), a.token)
    other = lock(fleet, k=1, ttl=4.0)
    end = time.monotonic() + 6.0  # longer than the TTL: only renewal keeps the place
    while time.monotonic() < end:
        assert not other.try_acquire()
        time.sleep(0.1)
    assert client.zscore(holders_key(fleet), a.token) > first  # renewed
    a.release()
    assert other.try_acquire()
    other.release()


def test_k_must_be_at_least_one(fleet):
    with pytest.raises(SettingError, match="MEMWARDEN_FLEET_MAX_RESTARTING"):
        lock(fleet, k=0)


def test_redis_down_lets_the_local_decision_through_and_says_so_once(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="memwarden")
    dead = lock("nowhere", url=DEAD)
    once = Once(HostLock(str(tmp_path / "lock")), dead)
    assert once.try_take()  # the host lock alone decides
    assert dead.try_acquire()  # asked again: still through, without waiting on Redis
    beat = Heartbeat(dead.link, "memwarden:nowhere:warden:h:1", 1.0, lambda: {"pid": 1})
    assert beat.beat() is False
    downs = [m for m in caplog.messages if "unreachable" in m]
    assert len(downs) == 1 and "local decisions go on" in downs[0]
    assert "127.0.0.1:1/7" in downs[0]


def test_a_warden_with_redis_down_runs_its_jobs(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="memwarden")
    warden = Warden(
        redis_url=DEAD, soft_limit="100GB", state_dir=str(tmp_path), heartbeat_interval=0.05
    )
    warden.start()
    try:
        for n in range(20):
            with warden.job("job", n):
                pass
        assert warden.counts["jobs"] == 20
        assert warden.once.try_take()  # the restart would go ahead on local terms
        wait_for(lambda: any("unreachable" in m for m in caplog.messages), 60, what="log")
    finally:
        warden.stop()
    assert sum("unreachable" in m for m in caplog.messages) == 1


def test_no_redis_url_no_fleet_and_passwords_stay_out(tmp_path):
    assert Fleet.from_config(Config(), {}) is None
    config = Config(redis_url="redis://:s3cret-pw@127.0.0.1:6379/7", fleet="jobs")
    fleet = Fleet.from_config(config, {"DYNO": "worker.3"})
    assert fleet is not None and fleet.name == "jobs" and fleet.host == "worker.3"
    for text in (repr(config), repr(fleet), repr(fleet.lock), fleet.link.where):
        assert "s3cret-pw" not in text
    assert Fleet.from_config(Config(redis_url=URL), {"HEROKU_APP_NAME": "shop"}).name == "shop"


# ------------------------------------------------------------------ real processes
@pytest.fixture
def workers(tmp_path, fleet) -> Iterator[Workers]:
    w = Workers(tmp_path, URL, fleet, f"{fleet}:run")
    try:
        yield w
    finally:
        w.close()


def max_overlap(events: list[dict[str, Any]]) -> int:
    """Most processes between their ``enter`` and their ``exit`` at the same moment."""
    timeline = sorted((e["t"], 1 if e["what"] == "enter" else -1) for e in events)
    # At equal times count exits first: an exit at t and an enter at t do not overlap.
    timeline.sort(key=lambda x: (x[0], x[1]))
    now = most = 0
    for _, step in timeline:
        now += step
        most = max(most, now)
    return most


@pytest.mark.slow
def test_ten_workers_at_once_never_more_than_two_restart(workers, client, fleet):
    tag = workers.tag
    workers.start(
        "restart",
        10,
        MEMWARDEN_FLEET_MAX_RESTARTING="2",
        MEMWARDEN_FLEET_LOCK_TTL="3",  # renewed every 1 s: robust on a busy machine
        HOLD="1.0",
    )
    wait_for(lambda: client.llen(f"{tag}:ready") == 10, 90, what="10 workers ready")
    # An independent watcher samples the live holders in Redis the whole time.
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(client.zcount(holders_key(fleet), server_ms(client), "+inf"))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    client.set(f"{tag}:go", 1)
    try:
        wait_for(
            lambda: client.llen(f"{tag}:events") == 20,
            120,
            what=f"10 restarts, one after another\n{workers.logs()}",
        )
    finally:
        stop.set()
        watcher.join(timeout=10)
    events = [json.loads(e) for e in client.lrange(f"{tag}:events", 0, -1)]
    assert sorted(e["pid"] for e in events if e["what"] == "enter") == sorted(
        p.pid for p in workers.procs
    )
    assert max_overlap(events) == 2  # never more than K, and K were used
    assert seen and max(seen) <= 2
    for p in workers.procs:
        assert p.wait(timeout=30) == 0  # each ended through its restart


@pytest.mark.slow
def test_a_sigkilled_holder_frees_its_place_within_the_ttl(workers, client, fleet):
    tag, ttl = workers.tag, 3.0
    (holder,) = workers.start(
        "restart", 1, MEMWARDEN_FLEET_MAX_RESTARTING="1", MEMWARDEN_FLEET_LOCK_TTL="3", HOLD="inf"
    )
    wait_for(lambda: client.llen(f"{tag}:ready") == 1, 90, what="worker ready")
    client.set(f"{tag}:go", 1)
    wait_for(lambda: client.llen(f"{tag}:events") == 1, 90, what="holder inside its restart")
    waiting = lock(fleet, k=1, ttl=ttl)
    assert not waiting.try_acquire()  # held, and renewed while the holder lives
    (token,) = [m.decode() for m in client.zrange(holders_key(fleet), 0, -1)]
    assert token.split(":")[-2] == str(holder.pid)
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=30) == -signal.SIGKILL
    killed_ms = server_ms(client)  # dead by now: no renewal after this
    expires_ms = client.zscore(holders_key(fleet), token)
    # The lease ends at most one TTL after the kill: nothing renews it any more.
    assert expires_ms is not None and expires_ms - killed_ms <= ttl * 1000
    wait_for(waiting.try_acquire, 60, interval=0.05, what="the dead holder's place")
    got_ms = server_ms(client)
    assert got_ms >= expires_ms  # not before its lease ran out
    waiting.release()


# ------------------------------------------------------------------ the warden's side
@pytest.fixture
def grown() -> Iterator[None]:
    yield
    workload.forget()


def over_soft_warden(fleet: str, tmp_path: Path, calls: list[str]) -> Warden:
    rss = self_rss()
    return Warden(
        hooks=Hooks(drain=lambda: calls.append("drain"), kill=lambda: calls.append("kill")),
        measure="process",
        soft_limit=f"{rss + 32 * MB}B",
        hard_limit=f"{rss + 160 * MB}B",
        reclaim=False,
        grace=0,
        min_uptime=0,
        restart="none",
        shutdown_timeout=3600,
        state_dir=str(tmp_path),
        redis_url=URL,
        fleet=fleet,
        fleet_max_restarting=1,
    )


def test_a_full_fleet_holds_a_soft_restart_until_a_place_frees(fleet, tmp_path, grown):
    calls: list[str] = []
    warden = over_soft_warden(fleet, tmp_path, calls)
    other = lock(fleet, k=1)
    assert other.try_acquire()
    try:
        assert warden.check().action is Action.OK
        workload.leak(64)
        assert warden.check().action is Action.RESTART
        assert warden.counts["restarts"] == 0 and calls == []  # still serving
        assert warden.check().action is Action.RESTART  # and asking again
        assert warden.counts["restarts"] == 0
        other.release()
        assert warden.check().action is Action.RESTART
        assert warden.counts["restarts"] == 1
        wait_for(lambda: "drain" in calls, 60, what="the drain")
        assert warden.fleet is not None and warden.fleet.lock.held
    finally:
        warden.stop()  # ends the restart sequence's wait before any hard kill
        other.release()
        if warden.fleet is not None:
            warden.fleet.lock.release()


def test_the_hard_limit_does_not_wait_for_the_fleet(fleet, tmp_path, grown):
    calls: list[str] = []
    warden = over_soft_warden(fleet, tmp_path, calls)
    other = lock(fleet, k=1)
    assert other.try_acquire()
    try:
        assert warden.check().action is Action.OK
        workload.leak(192)
        assert warden.check().action is Action.KILL
        assert calls == ["kill"]
    finally:
        warden.stop()
        other.release()


def test_check_says_when_the_fleet_redis_does_not_answer(client):
    assert fleet_checks(Config(), {}) == []
    assert fleet_checks(Config(redis_url=URL), {}) == []
    (warning,) = fleet_checks(Config(redis_url="redis://:pw-x@127.0.0.1:1/7"), {})
    assert "MEMWARDEN_REDIS_URL=redis://:***@127.0.0.1:1/7 does not answer" in warning
    assert "pw-x" not in warning


def test_a_holder_stuck_alive_lets_go_after_max_hold(fleet, client):
    stuck = FleetLock(Link(connect(URL), URL), fleet, k=1, ttl=1.0, max_hold=1.0)
    assert stuck.try_acquire()
    waiting = lock(fleet, k=1, ttl=1.0)
    assert not waiting.try_acquire()
    # Renewal stops after max_hold; the lease then runs out within one TTL.
    wait_for(waiting.try_acquire, 60, interval=0.05, what="the stuck holder's place")
    assert client.zscore(holders_key(fleet), stuck.token) is None
    waiting.release()
    stuck.release()
