"""Huey process workers under a shared cgroup figure: the hard kill is taken by a process
that runs a warden, never left to the consumer's main process or its scheduler (neither runs
a task nor a warden). Left to them, nobody kills: memory stays over the hard limit until the
kernel's OOM killer takes the largest process — the consumer — and orphans its workers
(issue 13).

The real ``huey_consumer`` (1 process worker) in a real memory cgroup, Redis DB 5. The
worker keeps 60 MiB and goes idle; then the consumer's main process (or its scheduler) takes
120 MiB after the fork: it is now the largest process (by RSS) of the cgroup, and the
cgroup's figure is over the hard limit with no task in flight. The worker — the one process
there with a warden — takes the kill: memory comes back under the limit, no task is lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from apps.huey_harness import consumer_argv, counts, huey_env, journal, producer
from apps.rq_harness import WorkerLoop
from cgroups import memory_cgroup
from conftest import need_service, wait_for
from memwarden.gauges.proc import children_of, rss

pytestmark = pytest.mark.slow

#: Soft = hard: the holder's one step crosses both at once, so the hard path is the one
#: taken (a soft crossing alone would have the idle worker leave gracefully).
LIMIT = "190MiB"
HOLD_MB = 120


def the_holder(env: dict[str, str], consumer: int, holder: str) -> int:
    """The consumer's main process, or its scheduler: the child that ran no task."""
    if holder == "consumer":
        return consumer
    workers = {r["pid"] for r in journal(env, "job")}
    (scheduler,) = [p for p in children_of(consumer) if p not in workers]
    return scheduler


@pytest.mark.parametrize("holder", ["consumer", "scheduler"])
def test_the_hard_kill_is_not_left_to_a_process_without_a_warden(
    tmp_path: Path, holder: str
) -> None:
    need_service("Redis", 6379)
    settings = {
        "MEMWARDEN_SOFT_LIMIT": LIMIT,
        "MEMWARDEN_HARD_LIMIT": LIMIT,
        "HUEY_TEST_HOLD_MB": str(HOLD_MB),
    }
    argv = consumer_argv("process", 1)
    argv[1] = "huey_holder.huey"
    log = tmp_path / "consumer.log"
    with (
        huey_env(tmp_path, **settings) as env,
        memory_cgroup(512 * 10**6) as cg,
        WorkerLoop(argv, env, log, cg) as loop,
    ):
        app = producer(env)
        try:
            for n in range(3):
                app.keep(n, 20.0, 0.0, True)
            wait_for(lambda: len(counts(env, "done")) == 3, 120, 0.2, "the worker's 60 MiB")
            assert loop.current is not None
            pid = the_holder(env, loop.current.pid, holder)
            os.kill(pid, signal.SIGUSR1)
            wait_for(lambda: rss(pid) > HOLD_MB * 2**20, 60, 0.1, f"the {holder}'s 120 MiB")
            wait_for(lambda: journal(env, "kill"), 90, 0.2, "a hard kill by a warden")
            os.kill(pid, signal.SIGUSR2)
            wait_for(lambda: rss(pid) < HOLD_MB * 2**20, 60, 0.1, "the holder's release")
            for n in range(3, 6):
                app.keep(n, 1.0, 0.0, False)
            wait_for(lambda: len(counts(env, "done")) == 6, 120, 0.2, "every task done")
        except AssertionError:
            print(log.read_text()[-6000:])
            raise
        oom_kills = cg.oom_kills()
        kills = journal(env, "kill")
        done = counts(env, "done")
    assert oom_kills == 0
    assert len(kills) == 1 and kills[0]["in_flight"] == [], kills
    assert kills[0]["total"] >= 190 * 2**20, kills  # the cgroup's figure, judged whole
    assert done == {n: 1 for n in range(6)}


@pytest.mark.parametrize("hog", ["zombie", "reaped"])
def test_an_idle_worker_does_not_take_the_figure_of_a_sibling_killed_as_it_read(
    hog: str,
) -> None:
    """The failure of ``test_200_growing_jobs_none_lost[process-…]`` on a busy machine: the
    hog's warden kills its process between the idle worker's reading of the consumer's
    figure (the hog's memory in it) and its look at the siblings (the hog no longer runs a
    warden, nor holds RSS). The idle worker took itself for the largest and judged a total
    that was the dead hog's: a hard kill with nothing in flight. Real processes, a real tree
    reading, a real SIGKILL; the kill is made to land in that gap every time."""
    script = Path(__file__).parent / "apps" / "largest_worker.py"
    out = subprocess.run(
        [sys.executable, str(script), hog], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    reading = json.loads(out.stdout)
    assert reading["whole"] > 200 * 2**20, reading  # the reading did count the hog
    assert reading["source"] == "tree/own", reading  # and the idle worker judged only its own
    assert reading["total"] == reading["mine"], reading
