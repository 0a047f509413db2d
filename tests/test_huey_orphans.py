"""A Huey consumer killed outright (the kernel's OOM killer, ``kill -9``) leaves its
process workers and its scheduler behind: forked, daemonic, they would go on taking tasks
beside the consumer started in its place, holding memory the next one is judged by. Each
notices that its parent is gone and leaves, a worker after its task in hand; no task is
lost, none runs twice.

The real ``huey_consumer`` (2 process workers) in a real memory cgroup, restarted by a loop
as a platform would; Redis DB 5; default memwarden settings.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest

from apps.huey_harness import consumer_argv, counts, huey_env, producer
from apps.rq_harness import WorkerLoop
from cgroups import memory_cgroup
from conftest import need_service, wait_for
from memwarden.gauges.proc import children_of

pytestmark = pytest.mark.slow

TASKS = 40


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_children_of_a_killed_consumer_leave_after_their_task(tmp_path: Path) -> None:
    need_service("Redis", 6379)
    log = tmp_path / "consumer.log"
    with (
        huey_env(tmp_path) as env,
        memory_cgroup(512 * 10**6) as cg,
        WorkerLoop(consumer_argv("process", 2), env, log, cg) as loop,
    ):
        app = producer(env)
        for n in range(TASKS):
            app.nap(n, 0.5)
        try:
            wait_for(lambda: len(counts(env, "attempts")) >= 2, 120, 0.1, "tasks under way")
            consumer = loop.current
            assert consumer is not None
            old = children_of(consumer.pid)
            assert len(old) == 3, old  # two workers and the scheduler
            os.kill(consumer.pid, signal.SIGKILL)
            wait_for(lambda: loop.exits, 60, 0.1, "the killed consumer's replacement")
            wait_for(
                lambda: not any(alive(p) for p in old),
                60,
                0.2,
                f"the killed consumer's children {old} to leave",
            )
            wait_for(lambda: len(counts(env, "done")) == TASKS, 180, 0.2, "every task done")
        except AssertionError:
            print(log.read_text()[-6000:])
            raise
        oom_kills = cg.oom_kills()
        done = counts(env, "done")
    assert oom_kills == 0
    assert loop.exits == [-signal.SIGKILL]
    assert done == {n: 1 for n in range(TASKS)}  # none lost, none run twice
