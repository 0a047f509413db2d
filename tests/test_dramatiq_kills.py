"""Dramatiq: every message in flight at a hard kill comes back, at once; a message that grows
without bound is quarantined after ``MEMWARDEN_POISON_KILLS`` kills, and no other message is
ever counted towards poison.

The real ``dramatiq`` CLI (1 process x 2 threads) on the Redis broker with **Dramatiq's
default** ``heartbeat_timeout`` (60 s) and ``maintenance_chance`` (0.1 % of commands), and on
RabbitMQ, in a real memory cgroup, with **default memwarden settings** (only the cgroup's
limit).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from apps.dramatiq_harness import (
    QUICK,
    REDIS_URL,
    dead_lettered,
    dramatiq_tree,
    expect,
    unacked,
    wait_until,
)
from cgroups import memory_cgroup
from conftest import need_service, wait_for
from memwarden.poison import PoisonJobs

pytestmark = pytest.mark.slow

#: Every memwarden setting at its default: the cgroup's limit is all the warden knows.
DEFAULTS: dict[str, str | None] = {}
POISON_KILLS = 3  # the default of MEMWARDEN_POISON_KILLS
#: How long a message in flight at a kill may take to come back and complete (s): far
#: below the broker's own heartbeat timeout plus its maintenance lottery (minutes).
COME_BACK = 150


@pytest.fixture
def store() -> Iterator[redis.Redis]:
    need_service("Redis", 6379)
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_every_message_in_flight_at_a_kill_comes_back_and_the_grower_is_quarantined(
    kind: str, tmp_path: Path, store: redis.Redis
) -> None:
    """The field case of issue 13 (item 7): 200 messages, every 7th keeping 25 MiB, and one
    that grows 100 MiB/s without bound, in a 512 MB dyno."""
    if kind == "rabbitmq":
        need_service("RabbitMQ", 5672)
    with (
        memory_cgroup(512 * 10**6) as dyno,
        dramatiq_tree(
            kind, tmp_path, store, DEFAULTS, dyno.join, processes=1, heartbeat_ms=None
        ) as tree,
    ):
        jobs = [f"m{i}" for i in range(200)]
        for i, job in enumerate(jobs[:60]):
            tree.send(job, "leak" if i % 7 == 6 else "light", 25, io_ms=20)
        grower = tree.send("grower", "grow", 10)
        for i, job in enumerate(jobs[60:], start=60):
            tree.send(job, "leak" if i % 7 == 6 else "light", 25, io_ms=20)

        started = time.monotonic()
        expect(
            lambda: any(r["job_id"] == grower for r in tree.records("quarantine")),
            COME_BACK,
            lambda: f"the grower quarantined; kills: {tree.records('kill')}\n{tree.tail()}",
        )
        left = max(10.0, COME_BACK - (time.monotonic() - started))
        if not wait_until(lambda: tree.done() >= set(jobs), timeout=left):
            missing = sorted(set(jobs) - tree.done())
            ids = {tree.sent[j] for j in missing}
            raise AssertionError(
                f"{len(missing)} messages never completed: {missing}; runs "
                f"{ {j: tree.runs().get(j) for j in missing} }; unacked "
                f"{ {k: v & ids for k, v in unacked(tree).items()} }\n{tree.tail()}"
            )

        kills = tree.records("kill")
        assert len(kills) == POISON_KILLS, kills
        # Each kill names the grower in flight, and nothing else was counted towards poison.
        assert all(grower in {j["job_id"] for j in k["in_flight"]} for k in kills), kills
        assert tree.runs()["grower"] == POISON_KILLS
        counted = {k.decode().rsplit(":", 1)[1] for k in store.scan_iter("memwarden:kills:*")}
        assert counted & set(tree.sent.values()) == {grower}
        assert PoisonJobs(store, kills=POISON_KILLS).count(grower) == POISON_KILLS
        assert "grower" not in tree.done()
        wait_for(lambda: grower in dead_lettered(tree), timeout=30, what="grower dead-lettered")
        # Nothing stays fetched-and-unacked behind a dead worker (Redis: its ack sets).
        wait_for(lambda: not unacked(tree), timeout=30, what=f"no unacked: {unacked(tree)}")
        assert dyno.oom_kills() == 0


def test_a_worker_killed_from_outside_has_its_messages_back_after_its_heartbeat_timeout(
    tmp_path: Path, store: redis.Redis
) -> None:
    """SIGKILL from elsewhere (the kernel's OOM killer, a platform): no hook of ours runs.
    With Dramatiq's own maintenance off and a 3 s heartbeat timeout, the next worker's sweep
    gives back what the dead one held, in hand and prefetched."""
    with dramatiq_tree(
        "redis", tmp_path, store, QUICK, processes=1, heartbeat_ms=3000, maintenance=0
    ) as tree:
        jobs = [f"s{i}" for i in range(4)]
        for job in jobs:
            tree.send(job, "light", io_ms=3000)
        expect(lambda: len(tree.runs()) == 2, 30, lambda: f"2 in hand: {tree.runs()}")
        (pid,) = tree.worker_pids()
        os.kill(pid, signal.SIGKILL)
        expect(
            lambda: tree.done() >= set(jobs),
            60,
            lambda: f"all back and done: {tree.done()}, unacked {unacked(tree)}\n{tree.tail()}",
        )
        runs = tree.runs()
        assert sorted(runs.values()) == [1, 1, 2, 2], runs  # the two in hand ran again
        assert tree.exits  # Dramatiq's main process shut down on the death, and came back
        assert "held by dead workers" in tree.log.read_text()
