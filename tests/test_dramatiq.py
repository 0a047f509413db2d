"""Dramatiq: records, drains and whole-tree reloads, hard kills that redeliver, poison messages.

End to end with the real ``dramatiq`` CLI (2 worker processes x 2 threads) on the Redis broker
and on RabbitMQ, running ``tests/apps/dramatiq_app.py``. Redis DB 4 holds the completions
(``{prefix}:done``), the runs per job (``{prefix}:runs``) and the poison counts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

from cgroups import memory_cgroup
from conftest import need_service, wait_for
from memwarden.dramatiq import MemoryWarden
from memwarden.journal import read_records
from memwarden.poison import PoisonJobs
from memwarden.units import SettingError

REDIS_URL = "redis://127.0.0.1:6379/4"  # this suite's Redis DB
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"
DRAMATIQ = Path(sys.executable).parent / "dramatiq"
MB = 1024 * 1024
POISON_KILLS = 2


@pytest.fixture
def store() -> Iterator[redis.Redis]:
    need_service("Redis", 6379)
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@dataclass
class Tree:
    """A running ``dramatiq`` CLI tree and what it writes."""

    kind: str
    queue: str
    prefix: str
    journal: Path
    log: Path
    store: redis.Redis
    broker: dramatiq.Broker
    proc: subprocess.Popen[bytes] | None = None
    sent: dict[str, str] = field(default_factory=dict)  # job id -> message id

    def send(self, job_id: str, kind: str = "light", mb: int = 0, io_ms: int = 0) -> str:
        message = dramatiq.Message(
            queue_name=self.queue,
            actor_name="mw_job",
            args=(job_id, kind, mb, io_ms),
            kwargs={},
            options={},
        )
        self.sent[job_id] = self.broker.enqueue(message).message_id
        return self.sent[job_id]

    def done(self) -> set[str]:
        return {m.decode() for m in self.store.smembers(f"{self.prefix}:done")}

    def runs(self) -> dict[str, int]:
        raw = self.store.hgetall(f"{self.prefix}:runs")
        return {k.decode(): int(v) for k, v in raw.items()}

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.journal.exists():
            return []
        records, _ = read_records(self.journal.read_text().splitlines())
        return [r for r in records if event is None or r["event"] == event]

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def ready(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, f"dramatiq exited:\n{self.log.read_text()[-3000:]}"
        return self.log.read_text().count("Worker process is ready") >= 2


@contextlib.contextmanager
def dramatiq_tree(
    kind: str,
    tmp_path: Path,
    store: redis.Redis,
    settings: dict[str, str | None] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[Tree]:
    """Start ``dramatiq dramatiq_app -p 2 -t 2`` on ``kind``'s broker; stop and clean it all.

    ``settings`` change the ``MEMWARDEN_*`` env of the tree (None: unset)."""
    tag = f"mwt-{kind}-{uuid.uuid4().hex[:8]}"
    if kind == "redis":
        broker: dramatiq.Broker = RedisBroker(url=REDIS_URL, namespace=tag)
    else:
        broker = RabbitmqBroker(url=AMQP_URL)
    broker.declare_queue(tag)
    tree = Tree(
        kind, tag, tag, tmp_path / "journal.jsonl", tmp_path / "dramatiq.log", store, broker
    )
    env = {
        **os.environ,
        "MWT_BROKER": kind,
        "MWT_BROKER_URL": REDIS_URL if kind == "redis" else AMQP_URL,
        "MWT_QUEUE": tag,
        "MWT_NAMESPACE": tag,
        "MWT_HEARTBEAT_MS": "5000",
        "MWT_REDIS_URL": REDIS_URL,
        "MWT_PREFIX": tag,
        # Own RSS against fixed limits: a worker process at rest is about 30 MB.
        "MEMWARDEN_MEASURE": "process",
        "MEMWARDEN_SOFT_LIMIT": "150MB",
        "MEMWARDEN_HARD_LIMIT": "400MB",
        "MEMWARDEN_GRACE": "0",
        "MEMWARDEN_MIN_UPTIME": "0",
        "MEMWARDEN_MAX_RESTARTS": "1000",
        "MEMWARDEN_INTERVAL": "0.2",
        "MEMWARDEN_SHUTDOWN_TIMEOUT": "20",
        "MEMWARDEN_POISON_KILLS": str(POISON_KILLS),
        "MEMWARDEN_JOURNAL": str(tree.journal),
        "MEMWARDEN_STATE_DIR": str(tmp_path / "state"),
    }
    for name in ("MEMWARDEN_RESTART", "MEMWARDEN_DRY_RUN", "MEMWARDEN_QUOTA"):
        env.pop(name, None)
    for name, value in (settings or {}).items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    with open(tree.log, "wb") as log:
        tree.proc = subprocess.Popen(
            [str(DRAMATIQ), "dramatiq_app", "--path", str(APPS), "-p", "2", "-t", "2"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: nothing of it outlives the test
            preexec_fn=preexec_fn,
        )
    try:
        wait_for(tree.ready, timeout=60, what="2 dramatiq worker processes")
        yield tree
    finally:
        stop_tree(tree.proc)
        cleanup(tree, store)


def stop_tree(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def cleanup(tree: Tree, store: redis.Redis) -> None:
    keys = list(store.scan_iter(f"{tree.prefix}*"))
    keys += [f"memwarden:kills:{mid}" for mid in tree.sent.values()]
    if keys:
        store.delete(*keys)
    if isinstance(tree.broker, RabbitmqBroker):
        for name in (tree.queue, f"{tree.queue}.DQ", f"{tree.queue}.XQ"):
            with contextlib.suppress(Exception):
                tree.broker.channel.queue_delete(name)
    tree.broker.close()


def dead_lettered(tree: Tree) -> list[str]:
    """Message ids in the queue's dead-letter queue."""
    if isinstance(tree.broker, RedisBroker):
        raw = tree.store.hvals(f"{tree.prefix}:{tree.queue}.XQ.msgs")
        return [dramatiq.Message.decode(m).message_id for m in raw]
    ids = []
    channel = tree.broker.channel
    while True:
        method, _, body = channel.basic_get(f"{tree.queue}.XQ", auto_ack=False)
        if method is None:
            break
        ids.append(dramatiq.Message.decode(body).message_id)
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "rabbitmq"])
def test_no_message_lost_through_reloads_kills_and_a_poison_message(
    kind: str, tmp_path: Path, store: redis.Redis
) -> None:
    if kind == "rabbitmq":
        need_service("RabbitMQ", 5672)
    with dramatiq_tree(kind, tmp_path, store) as tree:
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
            lambda: any(r["job_id"] == mid for r in tree.records("poison")),
            timeout=120,
            what="the poison message quarantined",
        )
        assert tree.runs()["hog"] == POISON_KILLS
        assert len([r for r in tree.records("kill") if mid in str(r["in_flight"])]) == POISON_KILLS
        assert "hog" not in tree.done()
        wait_for(lambda: mid in dead_lettered(tree), timeout=30, what="hog dead-lettered")
        assert "was running at 2 hard kills" in tree.log.read_text()

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
        defaults: dict[str, str | None] = {
            "MEMWARDEN_MEASURE": None,
            "MEMWARDEN_SOFT_LIMIT": None,
            "MEMWARDEN_HARD_LIMIT": None,
            "MEMWARDEN_POISON_KILLS": None,
        }
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
