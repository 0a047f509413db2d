"""Taskiq under memwarden: a real ``taskiq worker`` (its process manager, one worker
process, ``--max-async-tasks 4``) on real Redis, in a real memory cgroup.

A task running at a hard kill comes back at once (not after RedisStreamBroker's
``idle_timeout`` of 10 minutes), and even on ListQueueBroker, which takes a message off
Redis as it reads it; a task running at K kills is quarantined; over the soft limit the
worker reads no new message, and reads again under it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from taskiq_redis import ListQueueBroker, RedisStreamBroker

from apps.taskiq_harness import URL, counts, journal, send, taskiq_env, taskiq_worker
from cgroups import memory_cgroup
from conftest import need_service, wait_for
from memwarden.integrations.taskiq import loss_notes, no_loss_problems, worker_ack_type
from memwarden.records import problems

MB = 1024 * 1024
POISON_KILLS = 2
KILL_SETTINGS = {
    "MEMWARDEN_MEASURE": "tree",
    "MEMWARDEN_SOFT_LIMIT": "150MiB",
    "MEMWARDEN_HARD_LIMIT": "300MiB",
    "MEMWARDEN_GRACE": "60",
    "MEMWARDEN_POISON_KILLS": str(POISON_KILLS),
}

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("broker", ["stream", "list"])
def test_task_killed_at_the_hard_limit_comes_back(tmp_path: Path, broker: str) -> None:
    """A task crosses the hard limit: memwarden kills the worker process, counts one kill
    against the task and gives its message back; taskiq's process manager starts a new
    worker process, which runs it again at once. A task that was waiting runs once."""
    need_service("Redis", 6379)
    with (
        taskiq_env(tmp_path, broker, **KILL_SETTINGS) as env,
        memory_cgroup(1024 * MB) as cg,
        taskiq_worker(env, tmp_path / "worker.log", cg, "--max-async-tasks", "4"),
    ):
        wait_for(lambda: journal(env, "sample"), 60, what="the worker's watchdog")
        (hog,) = send(env, ("hog", 1, 400, True))
        wait_for(lambda: journal(env, "kill"), 60, what="the hard kill")
        killed = time.monotonic()
        wait_for(lambda: counts(env, "done").get(1), 30, what="the killed task, run again")
        back_in = time.monotonic() - killed
        (kill,) = journal(env, "kill")
        assert [j["job_id"] for j in kill["in_flight"]] == [hog]
        assert kill["given_back"] >= 1
        assert counts(env, "attempts") == {1: 2} and counts(env, "done") == {1: 1}
        assert back_in < 20  # not RedisStreamBroker's idle_timeout (600 s)
        prefix = f"memwarden:taskiq:{env['TASKIQ_TEST_QUEUE']}:kills"
        assert redis.Redis.from_url(URL).get(f"{prefix}:{hog}") == b"1"
        assert cg.oom_kills() == 0
        assert [p for r in journal(env) for p in problems(r)] == []


def test_poison_task_is_quarantined_after_k_kills(tmp_path: Path) -> None:
    """A task that crosses the hard limit every time is killed ``poison_kills`` times, then
    quarantined when it comes back: never run again, its message kept aside, a failed
    result; the tasks behind it run."""
    need_service("Redis", 6379)
    r = redis.Redis.from_url(URL)
    with (
        taskiq_env(tmp_path, **KILL_SETTINGS) as env,
        memory_cgroup(1024 * MB) as cg,
        taskiq_worker(env, tmp_path / "worker.log", cg, "--max-async-tasks", "4"),
    ):
        wait_for(lambda: journal(env, "sample"), 60, what="the worker's watchdog")
        (poison,) = send(env, ("hog", 1, 400))
        quarantine = f"memwarden:taskiq:{env['TASKIQ_TEST_QUEUE']}:quarantine"
        wait_for(lambda: r.llen(quarantine), 120, what="the poison task quarantined")
        send(env, ("light", 2))
        wait_for(lambda: counts(env, "done").get(2), 60, what="the queue to go on")
        assert counts(env, "attempts") == {1: POISON_KILLS, 2: 1}
        assert 1 not in counts(env, "done")
        assert len(journal(env, "kill")) == POISON_KILLS
        (q,) = journal(env, "quarantine")
        assert (q["job_id"], q["kills"], q["framework"]) == (poison, POISON_KILLS, "taskiq")
        assert r.llen(quarantine) == 1
        assert cg.oom_kills() == 0
        assert [p for r in journal(env) for p in problems(r)] == []


def test_big_task_pauses_intake_and_its_end_resumes_it(tmp_path: Path) -> None:
    """A task holds 150 MiB: over the soft limit the worker starts no other task though it
    may run three more; once the task frees its memory the next one starts, in the same
    worker process, with no restart."""
    need_service("Redis", 6379)
    settings = {
        "MEMWARDEN_MEASURE": "tree",
        "MEMWARDEN_SOFT_LIMIT": "100MiB",
        # At the task's 100 MiB/s the hard limit is more than grace + drain (9 s) away: only
        # intake is steered here, not the growth-aware restart.
        "MEMWARDEN_HARD_LIMIT": "1600MiB",
        "MEMWARDEN_GRACE": "8",
        "MEMWARDEN_SHUTDOWN_TIMEOUT": "1",
    }
    r = redis.Redis.from_url(URL)
    with (
        taskiq_env(tmp_path, **settings) as env,
        memory_cgroup(2048 * MB) as cg,
        taskiq_worker(env, tmp_path / "worker.log", cg, "--max-async-tasks", "4"),
    ):
        wait_for(lambda: journal(env, "sample"), 60, what="the worker's watchdog")
        send(env, ("big", 1, 150))
        wait_for(lambda: counts(env, "peaked").get(1), 60, what="the big task to peak")
        wait_for(lambda: journal(env, "pause"), 30, what="intake paused")
        send(env, ("light", 2))
        # The worker has room for the task: give it two seconds to (wrongly) start it.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and 2 not in counts(env, "started"):
            time.sleep(0.02)
        released = time.time()
        r.set(f"{env['TASKIQ_TEST_QUEUE']}:release:1", 1)
        wait_for(lambda: counts(env, "started").get(2), 60, what="the light task")
        assert counts(env, "started")[2] > released, "a task started over the soft limit"
        pauses, resumes = journal(env, "pause"), journal(env, "resume")
        assert len(pauses) == 1 and len(resumes) == 1 and pauses[0]["ts"] < resumes[0]["ts"]
        assert journal(env, "kill") == [] and journal(env, "restart") == []
        assert cg.oom_kills() == 0
        assert counts(env, "done") == {1: 1, 2: 1}


def test_leak_restarts_the_worker_gracefully_and_no_task_is_lost(tmp_path: Path) -> None:
    """Tasks that keep memory take the worker over the soft limit: it stops reading, lets
    its running tasks finish, stops (SIGTERM) and taskiq's process manager starts a fresh
    one. Every task runs to its end exactly once: those read and not begun at the stop
    went back to the stream, not to ``idle_timeout``; no kill."""
    need_service("Redis", 6379)
    settings = {
        "MEMWARDEN_MEASURE": "tree",
        "MEMWARDEN_SOFT_LIMIT": "150MiB",
        "MEMWARDEN_HARD_LIMIT": "900MiB",
        "MEMWARDEN_GRACE": "1",
        "MEMWARDEN_MIN_UPTIME": "0",
    }
    n = 16
    with (
        taskiq_env(tmp_path, **settings) as env,
        memory_cgroup(2048 * MB) as cg,
        taskiq_worker(env, tmp_path / "worker.log", cg, "--max-async-tasks", "4"),
    ):
        wait_for(lambda: journal(env, "sample"), 60, what="the worker's watchdog")
        send(env, *[("leaky", i, 30, 0.5) for i in range(n)])
        wait_for(lambda: len(counts(env, "done")) == n, 120, what="every task done")
        assert counts(env, "done") == dict.fromkeys(range(n), 1.0)
        assert counts(env, "attempts") == dict.fromkeys(range(n), 1.0)
        restarts = journal(env, "restart")
        pids = {j["pid"] for j in journal(env, "job")}
        assert restarts and len(pids) >= 2, "no graceful restart"
        assert journal(env, "kill") == [] and cg.oom_kills() == 0
        assert [p for r in journal(env) for p in problems(r)] == []


def test_task_in_flight_at_a_kernel_oom_kill_comes_back(tmp_path: Path) -> None:
    """The kernel's OOM killer (memwarden's limits out of reach) kills the worker process
    in the middle of a task: the next worker process, seeing the consumer's process gone,
    gives its messages back as it starts, one kill counted (not after ``idle_timeout``,
    600 s, nor after the consumer's 10 s lease)."""
    need_service("Redis", 6379)
    settings = {
        "MEMWARDEN_MEASURE": "tree",
        "MEMWARDEN_SOFT_LIMIT": "3GiB",
        "MEMWARDEN_HARD_LIMIT": "4GiB",
        "MEMWARDEN_POISON_KILLS": str(POISON_KILLS),
    }
    with (
        taskiq_env(tmp_path, **settings) as env,
        memory_cgroup(300 * MB) as cg,
        taskiq_worker(env, tmp_path / "worker.log", cg, "--max-async-tasks", "4"),
    ):
        wait_for(lambda: journal(env, "sample"), 60, what="the worker's watchdog")
        (hog,) = send(env, ("hog", 1, 400, True))
        wait_for(lambda: cg.oom_kills(), 60, what="the kernel's OOM kill")
        killed = time.monotonic()
        wait_for(lambda: counts(env, "done").get(1), 60, what="the OOM-killed task, run again")
        assert time.monotonic() - killed < 8
        assert counts(env, "attempts") == {1: 2} and counts(env, "done") == {1: 1}
        assert journal(env, "kill") == []  # the kernel's kill, not memwarden's
        (requeue,) = journal(env, "requeue")
        assert (requeue["by"], requeue["job"], requeue["job_id"]) == ("rescue", "hog", hog)
        assert requeue["kills"] == 1
        assert [p for r in journal(env) for p in problems(r)] == []


def test_a_platform_stop_finishes_running_tasks_and_gives_the_rest_back(tmp_path: Path) -> None:
    """SIGTERM to ``taskiq worker`` (a deploy, a scale-down): the two running tasks finish,
    the six read and not begun (one stream read takes them all) go back to the stream, not
    to ``idle_timeout``; the next worker runs them, each exactly once. No restart of
    memwarden's own (it knows the worker is being stopped)."""
    need_service("Redis", 6379)
    settings = {"MEMWARDEN_SOFT_LIMIT": "600MiB", "MEMWARDEN_HARD_LIMIT": "900MiB"}
    r = redis.Redis.from_url(URL)
    with taskiq_env(tmp_path, **settings) as env, memory_cgroup(1024 * MB) as cg:
        log = tmp_path / "worker.log"
        with taskiq_worker(env, log, cg, "--max-async-tasks", "2") as first:
            wait_for(lambda: b"guarding taskiq" in log.read_bytes(), 60, what="the warden")
            send(env, *[("leaky", i, 0, 3) for i in range(8)])
            wait_for(lambda: len(counts(env, "attempts")) == 2, 30, what="two tasks running")
            first.send_signal(signal.SIGTERM)
            first.wait(timeout=60)
            assert len(counts(env, "done")) == 2  # the running ones finished
            pending = r.xpending(env["TASKIQ_TEST_QUEUE"], "taskiq")
            assert pending["pending"] == 0  # none left with the stopped worker
        with taskiq_worker(env, log, cg, "--max-async-tasks", "4"):
            wait_for(lambda: len(counts(env, "done")) == 8, 60, what="every task done")
        assert counts(env, "done") == dict.fromkeys(range(8), 1.0)
        assert counts(env, "attempts") == dict.fromkeys(range(8), 1.0)
        assert journal(env, "restart") == [] and journal(env, "kill") == []


def test_loss_notes_name_the_settings_that_can_lose_a_task() -> None:
    """ListQueueBroker and ``--ack-type when_received`` can lose a task, and so can a stream
    group made at ``$``; the stream broker's redelivery delays are said."""
    (problem,) = no_loss_problems(ListQueueBroker(URL))
    assert "ListQueueBroker" in problem and "lost" in problem
    safe = RedisStreamBroker(URL, consumer_id="0", idle_timeout=120_000)
    assert no_loss_problems(safe) == []
    (note,) = loss_notes(safe)
    assert "at once" in note and "15 s" in note and "120 s" in note
    late = no_loss_problems(RedisStreamBroker(URL), "when_received")
    assert len(late) == 2
    assert "when_received" in late[0] and "consumer_id='0'" in late[1]
    assert worker_ack_type(["taskiq", "worker", "--ack-type", "WHEN_RECEIVED"]) == "when_received"
    assert worker_ack_type(["taskiq", "worker", "--ack-type=when_executed"]) == "when_executed"
    assert worker_ack_type(["taskiq", "worker"]) is None


def test_memwarden_check_says_which_broker_settings_lose_tasks(tmp_path: Path) -> None:
    """``memwarden check --taskiq-broker module:broker`` loads the broker as ``taskiq
    worker`` would (from the working directory) and warns of each setting that can lose a
    task; a broker it cannot load is a usage error."""
    (tmp_path / "tq_brokers.py").write_text(
        "from taskiq_redis import ListQueueBroker, RedisStreamBroker\n"
        f"lossy = ListQueueBroker({URL!r})\n"
        f"safe = RedisStreamBroker({URL!r}, consumer_id='0')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    env["MEMWARDEN_SOFT_LIMIT"] = "400MB"

    def check(spec: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "memwarden.cli", "check", "--taskiq-broker", spec]
        return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)

    lossy, safe, missing = check("tq_brokers:lossy"), check("tq_brokers:safe"), check("nope:b")
    assert lossy.returncode == 0 and safe.returncode == 0
    assert "taskiq: TASKS CAN BE LOST: ListQueueBroker" in lossy.stdout
    assert "TASKS CAN BE LOST" not in safe.stdout
    assert "taskiq: RedisStreamBroker: tasks held by a worker memwarden kills" in safe.stdout
    assert missing.returncode == 2 and "cannot load Taskiq broker 'nope:b'" in missing.stderr
