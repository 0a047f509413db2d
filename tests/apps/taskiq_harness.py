"""Harness for memwarden's taskiq tests: a real ``taskiq worker`` in a memory cgroup, the
environment, sending tasks, the journal and the counts the tasks keep in Redis."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from taskiq.kicker import AsyncKicker
from taskiq_redis import ListQueueBroker, RedisStreamBroker

from apps.harness import delete_keys, redis_counts, worker_env
from apps.harness import journal as journal  # the tests' import

APPS = Path(__file__).resolve().parent
URL = "redis://127.0.0.1:6379/12"  # taskiq's Redis DB in this project's tests
TASKIQ = str(Path(sys.executable).with_name("taskiq"))


@contextlib.contextmanager
def taskiq_env(tmp_path: Path, broker: str = "stream", **settings: str) -> Iterator[dict[str, str]]:
    """A worker's environment (no MEMWARDEN_* but ``settings``, the journal and the state
    dir) on a fresh queue; every key naming the queue is deleted afterwards."""
    queue = f"mw-taskiq-{uuid.uuid4().hex[:10]}"
    try:
        yield worker_env(
            tmp_path,
            [APPS],
            TASKIQ_TEST_QUEUE=queue,
            TASKIQ_TEST_BROKER=broker,
            TASKIQ_TEST_URL=URL,
            **settings,
        )
    finally:
        delete_keys(URL, f"*{queue}*")


@contextlib.contextmanager
def taskiq_worker(
    env: dict[str, str], log: Path, cgroup: Any, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """``taskiq worker taskiq_app:broker`` (its process manager restarts a worker process
    that dies), stopped with SIGTERM at the end, every process of it gone."""
    argv = [TASKIQ, "worker", "taskiq_app:broker", "--workers", "1", *args]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=cgroup.join
        )
    try:
        yield proc
    finally:
        tree: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            tree = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        for p in [proc, *tree]:
            with contextlib.suppress(psutil.Error, OSError):
                p.kill()
        proc.wait(timeout=10)
        cgroup.kill_all()


def send(env: dict[str, str], *tasks: tuple[Any, ...]) -> list[str]:
    """Send ``(task_name, *args)`` tasks to the env's queue; returns their task ids."""

    async def go() -> list[str]:
        b: ListQueueBroker | RedisStreamBroker
        if env["TASKIQ_TEST_BROKER"] == "list":
            b = ListQueueBroker(URL, queue_name=env["TASKIQ_TEST_QUEUE"])
        else:
            b = RedisStreamBroker(URL, queue_name=env["TASKIQ_TEST_QUEUE"], consumer_id="0")
        await b.startup()
        try:
            ids = []
            for name, *args in tasks:
                task = await AsyncKicker(name, b, {}).kiq(*args)
                ids.append(task.task_id)
            return ids
        finally:
            await b.shutdown()

    return asyncio.run(go())


def counts(env: dict[str, str], what: str) -> dict[int, float]:
    """The hash ``{queue}:{what}`` the tasks keep (done, attempts, started, …), by task."""
    return redis_counts(URL, f"{env['TASKIQ_TEST_QUEUE']}:{what}")
