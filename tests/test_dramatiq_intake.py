"""Dramatiq: intake pauses over the soft limit and resumes under it, no restart needed.

The real ``dramatiq`` CLI (1 process x 2 threads) on the Redis broker in a real memory cgroup.
A message takes 200 MiB in big (mmap'd) buffers, holds them, then frees them: over the soft
limit no message begins, the one in hand goes on, and when the big one ends intake resumes;
every prefetched message runs, once, with no restart. And in a Worker embedded in this
process: a message a worker thread takes while intake is paused waits, unbegun, for the
resume.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from apps.dramatiq_harness import REDIS_URL, dramatiq_tree, expect, unacked
from cgroups import memory_cgroup
from conftest import need_service
from memwarden.dramatiq import MemoryWarden

#: Own RSS against a soft limit; the hard one and the grace far enough that the spike's
#: rise (200 MiB/s) never calls for a restart: only the pause rung acts.
SETTINGS: dict[str, str | None] = {
    "MEMWARDEN_MEASURE": "process",
    "MEMWARDEN_SOFT_LIMIT": "150MB",
    "MEMWARDEN_HARD_LIMIT": "7GB",
    "MEMWARDEN_GRACE": "20",
    "MEMWARDEN_SHUTDOWN_TIMEOUT": "1",
}


@pytest.fixture
def store() -> Iterator[redis.Redis]:
    need_service("Redis", 6379)
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def started(record: dict[str, Any]) -> float:
    return float(record["ts"]) - float(record["duration_s"])


@pytest.mark.slow
def test_intake_pauses_over_the_soft_limit_and_resumes_when_the_big_message_ends(
    tmp_path: Path, store: redis.Redis
) -> None:
    with (
        memory_cgroup(8 * 2**30) as dyno,
        dramatiq_tree("redis", tmp_path, store, SETTINGS, dyno.join, processes=1) as tree,
    ):
        tree.send("long", "light", io_ms=4000)  # in hand through the pause
        tree.send("spike", "spike", 200, io_ms=6000)
        expect(lambda: tree.records("pause"), 60, lambda: f"a pause\n{tree.tail()}")
        lights = [f"l{i}" for i in range(10)]
        for job in lights:
            tree.send(job, "light", io_ms=10)
        everything = {"long", "spike", *lights}
        expect(
            lambda: tree.done() >= everything,
            90,
            lambda: f"all done; missing {everything - tree.done()}\n{tree.tail()}",
        )

        sent = set(tree.sent.values())  # each record comes a moment after its mark
        expect(
            lambda: {r["job_id"] for r in tree.records("job")} >= sent,
            60,
            lambda: f"a record from every message\n{tree.tail()}",
        )
        (pause,) = tree.records("pause")
        (resume,) = tree.records("resume")
        assert pause["ts"] < resume["ts"]
        assert not tree.records("restart") and not tree.records("kill")
        jobs = {r["job_id"]: r for r in tree.records("job")}
        by_name = {name: jobs[mid] for name, mid in tree.sent.items()}
        # The message in hand went on and ended during the pause; the big one ended it.
        assert pause["ts"] < by_name["long"]["ts"] < resume["ts"]
        assert started(by_name["long"]) < pause["ts"]
        assert abs(by_name["spike"]["ts"] - resume["ts"]) < 5
        # No message began while paused; every one ran once.
        begun_in_pause = [
            name for name, r in by_name.items() if pause["ts"] < started(r) < resume["ts"]
        ]
        assert begun_in_pause == []
        assert set(tree.runs().values()) == {1}
        assert not unacked(tree)
        assert dyno.oom_kills() == 0


def test_a_message_taken_while_paused_waits_unbegun_for_the_resume(
    tmp_path: Path, store: redis.Redis
) -> None:
    """The worker thread waits on the work queue (a long ``worker_timeout``) when intake
    pauses: it takes the next message at once, and the middleware holds it unbegun."""
    tag = f"mwt-hold-{uuid.uuid4().hex[:8]}"
    broker = RedisBroker(url=REDIS_URL, namespace=tag)
    warden = MemoryWarden(soft_limit="64GB", measure="process", state_dir=str(tmp_path / "state"))
    broker.add_middleware(warden)
    begun: list[float] = []

    @dramatiq.actor(broker=broker, queue_name=tag, actor_name="mw_hold")
    def mw_hold() -> None:
        begun.append(time.monotonic())

    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=6000)
    worker.start()
    try:
        warden.pause()
        mw_hold.send()
        expect(lambda: warden.holding, 5, lambda: "the message taken and held")
        time.sleep(1.0)  # a second in which it would have run
        assert begun == [] and warden.in_hand() == []
        resumed = time.monotonic()
        warden.resume()
        expect(lambda: begun, 10, lambda: "the message run after the resume")
        assert begun[0] >= resumed
        worker.join()
    finally:
        worker.stop()
        broker.close()
        leftovers = list(store.scan_iter(f"{tag}*"))
        if leftovers:
            store.delete(*leftovers)
