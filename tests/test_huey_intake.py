"""Huey intake under memory pressure: a real ``huey_consumer`` (thread and process workers) in
a real memory cgroup on Redis pauses its fetch over the soft limit and resumes it under.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from apps.huey_harness import URL, consumer_argv, counts, huey_env, journal, producer
from apps.rq_harness import WorkerLoop
from cgroups import memory_cgroup
from conftest import need_service, wait_for

MB = 1024 * 1024

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_big_task_pauses_the_fetch_and_its_end_resumes_it(tmp_path: Path, worker_type: str) -> None:
    """A task holds 150 MiB: over the soft limit no worker of the consumer takes a new task
    while it holds them (the others are idle); once it frees them the next task runs, in
    the same consumer, with no restart."""
    need_service("Redis", 6379)
    settings = {
        "MEMWARDEN_MEASURE": "tree",
        "MEMWARDEN_SOFT_LIMIT": "100MiB",
        # At the task's 100 MiB/s the hard limit is more than grace + drain (9 s) away:
        # only intake is steered here, not the growth-aware restart.
        "MEMWARDEN_HARD_LIMIT": "1600MiB",
        "MEMWARDEN_GRACE": "8",
        "MEMWARDEN_SHUTDOWN_TIMEOUT": "1",
    }
    r = redis.Redis.from_url(URL)
    argv = consumer_argv(worker_type, 2)
    with (
        huey_env(tmp_path, **settings) as env,
        memory_cgroup(2048 * MB) as cg,
        WorkerLoop(argv, env, tmp_path / "consumer.log", cg) as loop,
    ):
        app = producer(env)
        wait_for(lambda: journal(env, "sample"), 60, what="the consumer's watchdog")
        app.big(1, 150)
        wait_for(lambda: counts(env, "peaked").get(1), 60, what="the big task to peak")
        app.light(2)
        # Over the soft limit the other worker is idle: give it the time a fetch takes.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and 2 not in counts(env, "started"):
            time.sleep(0.02)
        released = time.time()
        r.set(f"{env['HUEY_TEST_NAME']}:release:1", 1)
        wait_for(lambda: counts(env, "started").get(2), 60, what="the light task")
        oom_kills = cg.oom_kills()
        assert counts(env, "started")[2] > released, "a task started over the soft limit"
        pauses, resumes = journal(env, "pause"), journal(env, "resume")
        assert pauses and resumes and pauses[0]["ts"] < resumes[0]["ts"]
        assert journal(env, "kill") == [] and oom_kills == 0
        actions = {x["action"] for x in journal(env, "restart")}
        assert actions <= {"recycle"}  # a process worker's child may be recycled, no more
    assert loop.exits == []  # the consumer itself never stopped
