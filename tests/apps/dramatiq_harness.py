"""Harness for memwarden's Dramatiq tests: a real ``dramatiq`` CLI tree running
``tests/apps/dramatiq_app.py``, kept running as a platform would, and what it leaves behind.

Redis DB 4 holds the completions (``{prefix}:done``), the runs per job (``{prefix}:runs``)
and the poison counts; the Redis broker's keys live under the tree's own namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dramatiq
import psutil
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker

from conftest import wait_for
from memwarden.journal import read_records

REDIS_URL = "redis://127.0.0.1:6379/4"  # the Dramatiq tests' Redis database
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
APPS = Path(__file__).resolve().parent
DRAMATIQ = Path(sys.executable).parent / "dramatiq"

#: Fixed limits on each process's own RSS, quick to act: a worker process at rest is ~30 MB.
QUICK = {
    "MEMWARDEN_MEASURE": "process",
    "MEMWARDEN_SOFT_LIMIT": "150MB",
    "MEMWARDEN_HARD_LIMIT": "400MB",
    "MEMWARDEN_GRACE": "0",
    "MEMWARDEN_MIN_UPTIME": "0",
    "MEMWARDEN_MAX_RESTARTS": "1000",
    "MEMWARDEN_INTERVAL": "0.2",
    "MEMWARDEN_SHUTDOWN_TIMEOUT": "20",
}


@dataclass
class Tree:
    """A ``dramatiq`` CLI tree (started again whenever it exits) and what it writes."""

    kind: str
    queue: str
    prefix: str
    journal: Path
    log: Path
    store: redis.Redis
    broker: dramatiq.Broker
    processes: int = 2
    proc: subprocess.Popen[bytes] | None = None
    exits: list[int] = field(default_factory=list)  # statuses of the CLI's own exits
    sent: dict[str, str] = field(default_factory=dict)  # job id -> message id

    def send(self, job_id: str, kind: str = "light", mb: float = 0, io_ms: int = 0) -> str:
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
        return self.log.read_text().count("Worker process is ready") >= self.processes

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def tree_env(
    tree: Tree, heartbeat_ms: int | None, settings: dict[str, str | None] | None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMWARDEN_", "dramatiq_"))}
    env.update(
        MWT_BROKER=tree.kind,
        MWT_BROKER_URL=REDIS_URL if tree.kind == "redis" else AMQP_URL,
        MWT_QUEUE=tree.queue,
        MWT_NAMESPACE=tree.queue,
        MWT_REDIS_URL=REDIS_URL,
        MWT_PREFIX=tree.prefix,
        MEMWARDEN_JOURNAL=str(tree.journal),
        MEMWARDEN_STATE_DIR=str(tree.journal.parent / "state"),
    )
    if heartbeat_ms is not None:
        env["MWT_HEARTBEAT_MS"] = str(heartbeat_ms)
    for name, value in (settings or {}).items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    return env


@contextlib.contextmanager
def dramatiq_tree(
    kind: str,
    tmp_path: Path,
    store: redis.Redis,
    settings: dict[str, str | None] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    processes: int = 2,
    threads: int = 2,
    heartbeat_ms: int | None = 5000,
    maintenance: int | None = None,
    extra_args: tuple[str, ...] = (),
) -> Iterator[Tree]:
    """Start ``dramatiq dramatiq_app -p processes -t threads`` on ``kind``'s broker, start it
    again whenever it exits (as a platform does), then stop and clean it all.

    ``settings`` are the ``MEMWARDEN_*`` env of the tree (None: unset); ``heartbeat_ms`` the
    Redis broker's ``heartbeat_timeout`` with maintenance on every command, or on
    ``maintenance`` per million (None: Dramatiq's defaults, 60 s and 0.1 % of commands)."""
    tag = f"mwt-{kind}-{uuid.uuid4().hex[:8]}"
    if kind == "redis":
        broker: dramatiq.Broker = RedisBroker(url=REDIS_URL, namespace=tag)
    else:
        broker = RabbitmqBroker(url=AMQP_URL)
    broker.declare_queue(tag)
    tree = Tree(
        kind,
        tag,
        tag,
        tmp_path / "journal.jsonl",
        tmp_path / "dramatiq.log",
        store,
        broker,
        processes=processes,
    )
    env = tree_env(tree, heartbeat_ms, settings)
    if maintenance is not None:
        env["MWT_MAINTENANCE"] = str(maintenance)
    argv = [str(DRAMATIQ), "dramatiq_app", "--path", str(APPS), "-p", str(processes)]
    argv += ["-t", str(threads), *extra_args]
    stopping = threading.Event()
    spawning = threading.Lock()

    def spawn() -> None:
        with open(tree.log, "ab") as log:
            tree.proc = subprocess.Popen(
                argv,
                cwd=tmp_path,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: nothing of it outlives the test
                preexec_fn=preexec_fn,
            )

    def keep_running() -> None:
        while True:
            assert tree.proc is not None
            status = tree.proc.wait()
            with spawning:
                if stopping.is_set():
                    return
                tree.exits.append(status)
                kill_group(tree.proc.pid)
                spawn()

    spawn()
    loop = threading.Thread(target=keep_running, daemon=True)
    loop.start()
    try:
        wait_for(tree.ready, timeout=60, what=f"{processes} dramatiq worker processes")
        yield tree
    finally:
        with spawning:
            stopping.set()
        assert tree.proc is not None
        stop_tree(tree.proc)
        loop.join(timeout=30)
        cleanup(tree, store)


def kill_group(pid: int) -> None:
    """SIGKILL what is left of a stopped tree (its own session and process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def stop_tree(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
    kill_group(proc.pid)
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


def unacked(tree: Tree) -> dict[str, set[str]]:
    """Redis broker: the message ids held in each worker's ack set (fetched, not acked)."""
    out: dict[str, set[str]] = {}
    for key in tree.store.scan_iter(f"{tree.prefix}:__acks__.*"):
        members = {m.decode() for m in tree.store.smembers(key)}
        if members:
            out[key.decode()] = members
    return out


def wait_until(condition: Callable[[], object], timeout: float, step: float = 0.2) -> bool:
    """Poll ``condition`` until truthy or ``timeout`` s pass; whether it came true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


def expect(condition: Callable[[], object], timeout: float, describe: Callable[[], str]) -> None:
    """Wait for ``condition``; fail with ``describe()`` (said at the deadline) if it never holds."""
    if not wait_until(condition, timeout):
        raise AssertionError(f"not within {timeout:g} s: {describe()}")
