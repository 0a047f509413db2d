"""Dramatiq: records, drains and whole-tree reloads, hard kills that redeliver, poison messages.

End to end with the real ``dramatiq`` CLI (2 worker processes x 2 threads) on the Redis broker
and on RabbitMQ, running ``tests/apps/dramatiq_app.py``. Redis DB 4 holds the completions
(``{prefix}:done``), the runs per job (``{prefix}:runs``) and the poison counts.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from apps.dramatiq_harness import QUICK, REDIS_URL, dead_lettered, dramatiq_tree
from cgroups import memory_cgroup
from conftest import need_service, wait_for
from memwarden.dramatiq import MemoryWarden
from memwarden.journal import read_records
from memwarden.poison import PoisonJobs
from memwarden.records import problems
from memwarden.units import SettingError

MB = 1024 * 1024
POISON_KILLS = 2
#: The end-to-end tests' settings: quick fixed limits, a 2-kill quarantine.
SETTINGS: dict[str, str | None] = {**QUICK, "MEMWARDEN_POISON_KILLS": str(POISON_KILLS)}


@pytest.fixture
def store() -> Iterator[redis.Redis]:
    need_service("Redis", 6379)
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_no_message_lost_through_reloads_kills_and_a_poison_message(
    kind: str, tmp_path: Path, store: redis.Redis
) -> None:
    if kind == "rabbitmq":
        need_service("RabbitMQ", 5672)
    with dramatiq_tree(kind, tmp_path, store, SETTINGS) as tree:
        main_pid = tree.proc.pid if tree.proc else 0

        # 1. 240 messages, 48 of which keep 20 MiB each (a real leak, which reclaim cannot
        #    undo): the process that crosses 150 MB drains and the whole tree reloads.
        jobs = []
        for i in range(240):
            kind_of, mb = (
                ("leak", 20) if i % 5 == 3 else ("fragment", 8) if i % 10 == 7 else ("light", 0)
            )
            jobs.append(f"j{i}")
            tree.send(f"j{i}", kind_of, mb)
        wait_for(lambda: tree.done() >= set(jobs), timeout=180, what="all 240 messages done")
        sent = {tree.sent[j] for j in jobs}  # each record comes a moment after its mark
        recorded = lambda: {r["job_id"] for r in tree.records("job")} >= sent  # noqa: E731
        wait_for(recorded, timeout=60, what="a record from every message")

        restarts = tree.records("restart")
        assert len(restarts) >= 3, restarts
        assert {r["action"] for r in restarts} == {"reload"}
        assert not tree.records("kill")
        # Drains let in-flight messages finish: no message was interrupted and run again.
        runs = tree.runs()
        assert {j: runs[j] for j in jobs if runs[j] != 1} == {}
        job_records = tree.records("job")
        assert {r["job"] for r in job_records} == {"mw_job"}
        assert {r["job_id"] for r in job_records} >= {tree.sent[j] for j in jobs}
        assert {r["queue"] for r in job_records} == {tree.queue}
        assert len({r["pid"] for r in job_records}) >= 2 * 3  # fresh worker processes
        wait_for(lambda: len(tree.worker_pids()) == 2, timeout=60, what="2 worker processes")
        assert tree.proc is not None and tree.proc.pid == main_pid and tree.proc.poll() is None

        # 2. A message that grows past the hard limit mid-job (on its first run only): the
        #    watchdog kills its process, the broker redelivers it, the second run completes.
        mid = tree.send("hog-once", "hog_once", 450)
        wait_for(lambda: "hog-once" in tree.done(), timeout=90, what="hog-once redelivered")
        kills = [r for r in tree.records("kill") if mid in str(r["in_flight"])]
        assert len(kills) == 1 and "over hard limit" in kills[0]["reason"], kills
        assert tree.runs()["hog-once"] == 2
        assert mid not in {r["job_id"] for r in tree.records("job") if r["pid"] == kills[0]["pid"]}
        assert PoisonJobs(store, kills=POISON_KILLS).count(mid) == 1

        # 3. A message that does it every time: killed POISON_KILLS times, then failed into
        #    the dead-letter queue instead of being run again.
        mid = tree.send("hog", "hog", 450)
        wait_for(
            lambda: any(r["job_id"] == mid for r in tree.records("quarantine")),
            timeout=120,
            what="the poison message quarantined",
        )
        assert tree.runs()["hog"] == POISON_KILLS
        assert len([r for r in tree.records("kill") if mid in str(r["in_flight"])]) == POISON_KILLS
        assert "hog" not in tree.done()
        wait_for(lambda: mid in dead_lettered(tree), timeout=30, what="hog dead-lettered")
        assert "was running at 2 hard kills" in tree.log.read_text()
        assert [p for r in tree.records() for p in problems(r)] == []  # the journal's schema

        # The tree lives on and keeps serving.
        tree.send("after", "light")
        wait_for(lambda: "after" in tree.done(), timeout=60, what="a message after it all")
        assert tree.proc.pid == main_pid and tree.proc.poll() is None


@pytest.mark.slow
def test_default_limits_keep_the_tree_inside_a_memory_limited_dyno(
    tmp_path: Path, store: redis.Redis
) -> None:
    """No limit set: the quota is the cgroup's (400 MB), the gauge its working set, soft 85 %
    and hard 95 % of it. The tree grows past its quota in total; reloads keep it inside
    with no OOM kill by the kernel, and no message is lost."""
    with memory_cgroup(400 * 10**6) as dyno:
        limits = ("MEMWARDEN_MEASURE", "MEMWARDEN_SOFT_LIMIT", "MEMWARDEN_HARD_LIMIT")
        defaults = {k: v for k, v in QUICK.items() if k not in limits}
        with dramatiq_tree("redis", tmp_path, store, defaults, preexec_fn=dyno.join) as tree:
            assert len(dyno.pids()) == 3  # main + 2 worker processes
            # 200 of 400 messages keep 4 MiB each (840 MB in all, twice the quota), at about
            # 80 MB/s over the 4 worker threads: brisk, but a pace a watchdog can follow.
            jobs = [f"d{i}" for i in range(400)]
            for i, job in enumerate(jobs):
                tree.send(job, "leak" if i % 2 else "light", 4, io_ms=100)
            wait_for(lambda: tree.done() >= set(jobs), timeout=180, what="400 messages done")
            restarts = tree.records("restart")
            assert len(restarts) >= 2, restarts
            assert {r["gauge"] for r in restarts} == {"cgroup"}
            assert not tree.records("kill")  # inside the soft-hard margin, only reloads
            assert dyno.oom_kills() == 0
            assert tree.proc is not None and tree.proc.poll() is None


def test_in_process_worker_records_messages_and_survives_a_broken_poison_store(
    tmp_path: Path, store: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A Worker embedded in this process: per-message records; an unreachable poison store
    is logged and swallowed, never failing a message."""
    tag = f"mwt-inproc-{uuid.uuid4().hex[:8]}"
    journal = tmp_path / "journal.jsonl"
    broker = RedisBroker(url=REDIS_URL, namespace=tag)
    broker.add_middleware(
        MemoryWarden(
            poison_url="redis://127.0.0.1:1/0",  # nothing listens there
            soft_limit="64GB",
            measure="process",
            journal=str(journal),
            state_dir=str(tmp_path / "state"),
        )
    )
    done: list[str] = []

    @dramatiq.actor(broker=broker, queue_name=tag, actor_name="mw_inproc")
    def mw_inproc(n: int) -> None:
        done.append(str(n))

    worker = dramatiq.Worker(broker, worker_threads=2, worker_timeout=100)
    worker.start()
    try:
        sent = [mw_inproc.send(n).message_id for n in range(5)]
        wait_for(lambda: len(done) == 5, timeout=30, what="5 messages")
        worker.join()
    finally:
        worker.stop()
        broker.close()
        leftovers = list(store.scan_iter(f"{tag}*"))
        if leftovers:
            store.delete(*leftovers)
    records, bad = read_records(journal.read_text().splitlines())
    jobs = [r for r in records if r["event"] == "job"]
    assert bad == 0 and sorted(done) == ["0", "1", "2", "3", "4"]
    assert sorted(r["job_id"] for r in jobs) == sorted(sent)
    assert {(r["job"], r["queue"], r["framework"]) for r in jobs} == {
        ("mw_inproc", tag, "dramatiq")
    }
    broken = [r for r in caplog.records if "internal error in _poison_kills" in r.getMessage()]
    assert len(broken) == 5  # one per message, each logged and swallowed


def test_bad_setting_names_the_env_var() -> None:
    with pytest.raises(SettingError) as err:
        MemoryWarden(soft_limit="lots")
    assert "MEMWARDEN_SOFT_LIMIT" in str(err.value)
    with pytest.raises(SettingError) as err:
        MemoryWarden(restart="reboot")
    assert "MEMWARDEN_RESTART" in str(err.value)
