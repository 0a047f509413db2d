"""Huey tasks at a kill: each task in flight at the instant comes back, within a bounded
time, or is quarantined after K kills; a task that ended before the instant is neither run
again nor counted towards poison.

A real ``huey_consumer`` on Redis in a real memory cgroup, restarted by a loop as a platform
would. Kills by memwarden and by the kernel's OOM killer (memwarden's limits out of reach):
Huey deletes a task from Redis as a worker takes it, so a task the kernel kills is lost
unless memwarden kept a copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from apps.huey_harness import URL, consumer_argv, counts, huey_env, journal, producer
from apps.rq_harness import WorkerLoop
from cgroups import memory_cgroup
from conftest import need_service, wait_for
from memwarden.records import problems

MB = 1024 * 1024
POISON_KILLS = 2

pytestmark = pytest.mark.slow


def test_task_that_ended_before_the_kill_is_neither_run_again_nor_counted(tmp_path: Path) -> None:
    """A task ends (its result stored, memwarden's after-task hook run) and the app's own
    after-task hook lingers; meanwhile the other worker's task crosses the hard limit and
    the consumer is killed. The ended task is not put back, runs once, and no kill counts
    against it; the kill record names only the task that was running."""
    need_service("Redis", 6379)
    settings = {
        "MEMWARDEN_MEASURE": "tree",
        "MEMWARDEN_SOFT_LIMIT": "150MiB",
        "MEMWARDEN_HARD_LIMIT": "300MiB",
        "MEMWARDEN_GRACE": "60",
        "MEMWARDEN_POISON_KILLS": str(POISON_KILLS),
    }
    argv = consumer_argv("thread", 2)
    with (
        huey_env(tmp_path, **settings) as env,
        memory_cgroup(1024 * MB) as cg,
        WorkerLoop(argv, env, tmp_path / "consumer.log", cg),
    ):
        app = producer(env)
        ended = app.lingering.s(1)
        app.huey.enqueue(ended)
        wait_for(lambda: counts(env, "done").get(1), 60, what="the lingering task's end")
        hog = app.hog.s(2, 400, first_only=True)
        app.huey.enqueue(hog)
        wait_for(lambda: counts(env, "done").get(2), 60, what="the killed task, run again")
        kills = journal(env, "kill")
        assert len(kills) == 1
        assert [j["job_id"] for j in kills[0]["in_flight"]] == [hog.id]
        assert counts(env, "done") == {1: 1, 2: 1}
        r = redis.Redis.from_url(URL)
        prefix = f"memwarden:huey:{env['HUEY_TEST_NAME']}:kills"
        assert r.get(f"{prefix}:{ended.id}") is None  # not counted towards poison
        assert r.get(f"{prefix}:{hog.id}") == b"1"


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_task_in_flight_at_a_kernel_oom_kill_comes_back(tmp_path: Path, worker_type: str) -> None:
    """The kernel's OOM killer (not memwarden) kills the consumer, or a process worker, in
    the middle of a task: the task comes back — put back by the next worker as it starts —
    and completes; a task OOM-killed every time is quarantined after K kills, and the
    queue goes on."""
    need_service("Redis", 6379)
    settings = {
        "MEMWARDEN_MEASURE": "tree",
        "MEMWARDEN_SOFT_LIMIT": "3GiB",
        "MEMWARDEN_HARD_LIMIT": "4GiB",
        "MEMWARDEN_POISON_KILLS": str(POISON_KILLS),
    }
    argv = consumer_argv(worker_type, 1)
    with (
        huey_env(tmp_path, **settings) as env,
        memory_cgroup(300 * MB) as cg,
        WorkerLoop(argv, env, tmp_path / "consumer.log", cg),
    ):
        app = producer(env)
        wait_for(lambda: journal(env, "sample"), 60, what="the consumer's watchdog")
        app.hog(1, 400, first_only=True)
        wait_for(lambda: counts(env, "done").get(1), 60, what="the OOM-killed task again")
        poison = app.hog.s(2, 400)
        app.huey.enqueue(poison)
        quarantine = f"memwarden:huey:{env['HUEY_TEST_NAME']}:quarantine"
        r = redis.Redis.from_url(URL)
        wait_for(lambda: r.llen(quarantine), 90, what="the poison task quarantined")
        app.work(3)
        wait_for(lambda: counts(env, "done").get(3), 60, what="the queue to go on")
        oom_kills = cg.oom_kills()
        assert counts(env, "attempts") == {1: 2, 2: POISON_KILLS}
        assert counts(env, "done") == {1: 1, 3: 1}
        assert oom_kills >= 1 + POISON_KILLS
        assert journal(env, "kill") == []  # the kernel's kills, not memwarden's
        quarantined = journal(env, "quarantine")
        assert [(q["job_id"], q["kills"]) for q in quarantined] == [(poison.id, POISON_KILLS)]
        comebacks = journal(env, "requeue")
        assert [c["by"] for c in comebacks] == ["rescue"] * POISON_KILLS
        assert [p for r in journal(env) for p in problems(r)] == []  # the journal's schema


def test_hard_kill_does_not_wait_for_idle_fetches(tmp_path: Path) -> None:
    """Idle worker threads sit in Huey's blocking fetch (BLMOVE, up to the storage's read
    timeout: 1 s by default, 30 s here) while one task grows without end, with default
    limits: over soft the consumer pauses and a restart is decided, and at the hard limit
    memwarden's kill comes at once — not after those fetches return, by which time the
    kernel's OOM killer has taken the consumer (16 MiB between the hard limit and the
    quota: half a second at this rate). The task is quarantined after K kills.

    The limits sit 10% lower than the defaults (soft 75%, hard 85%: 45 MiB, 1.4 s at this
    rate, between the hard limit and the quota): the 2 s wait for the fetches still loses to
    the kernel, while a separate stall seen on a loaded machine near the cgroup's limit (a
    reading 0.3 s late: the growing thread holds the GIL through page faults in the
    kernel's reclaim) does not decide this test."""
    need_service("Redis", 6379)
    settings = {"MEMWARDEN_POISON_KILLS": str(POISON_KILLS), "HUEY_TEST_READ_TIMEOUT": "30"}
    settings.update(MEMWARDEN_SOFT_LIMIT="75%", MEMWARDEN_HARD_LIMIT="85%")
    with (
        huey_env(tmp_path, **settings) as env,
        memory_cgroup(320 * MB) as cg,
        WorkerLoop(consumer_argv("thread", 4), env, tmp_path / "consumer.log", cg),
    ):
        app = producer(env)
        wait_for(lambda: journal(env, "sample"), 60, what="the consumer's watchdog")
        poison = app.big.s(1, 4096, 32.0)  # 32 MiB/s, never let go
        app.huey.enqueue(poison)
        quarantine = f"memwarden:huey:{env['HUEY_TEST_NAME']}:quarantine"
        r = redis.Redis.from_url(URL)
        wait_for(lambda: r.llen(quarantine) or cg.oom_kills(), 120, what="the poison task's end")
        app.work(2)
        wait_for(lambda: counts(env, "done").get(2), 60, what="the queue to go on")
        oom_kills, attempts = cg.oom_kills(), counts(env, "attempts")
    kills = journal(env, "kill")
    assert oom_kills == 0, kills
    assert [[j["job_id"] for j in k["in_flight"]] for k in kills] == [[poison.id]] * POISON_KILLS
    assert {r["action"] for r in journal(env, "restart")} == {"signal"}  # decided first
    assert attempts == {1: POISON_KILLS}
