"""arq jobs at a kill: each job in flight at the instant comes back at once, or is
quarantined after K kills; a job that ended before the instant is not counted towards
poison.

A real ``arq`` worker (``max_jobs = 4``) on Redis in a real memory cgroup, restarted by a
loop as a platform would. Kills by memwarden and by the kernel's OOM killer (memwarden's
limits out of reach): arq itself would run a job cut by the kernel again only once its
in-progress key expires (``job_timeout`` + 10 s: 70 s here), and try it up to
``max_tries`` times.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from apps.arq_harness import ARQ_WORKER, URL, arq_env, counts, enqueue, journal
from apps.rq_harness import WorkerLoop
from cgroups import memory_cgroup
from conftest import need_service, wait_for
from memwarden.records import problems

MB = 1024 * 1024
POISON_KILLS = 2

pytestmark = pytest.mark.slow


def test_job_that_ended_before_the_kill_is_not_counted(tmp_path: Path) -> None:
    """A job ends (arq has recorded it) and the app's own after-job hook lingers; meanwhile
    another job crosses the hard limit and the worker is killed. The ended job runs once
    and no kill counts against it; the kill record names only the job that was running."""
    need_service("Redis", 6379)
    settings = {
        "MEMWARDEN_MEASURE": "tree",
        "MEMWARDEN_SOFT_LIMIT": "150MiB",
        "MEMWARDEN_HARD_LIMIT": "300MiB",
        "MEMWARDEN_GRACE": "60",
        "MEMWARDEN_POISON_KILLS": str(POISON_KILLS),
    }
    with (
        arq_env(tmp_path, **settings) as env,
        memory_cgroup(1024 * MB) as cg,
        WorkerLoop(ARQ_WORKER, env, tmp_path / "worker.log", cg),
    ):
        (ended,) = enqueue(env, ("lingering", 1))
        wait_for(lambda: counts(env, "done").get(1), 60, what="the lingering job's end")
        (hog,) = enqueue(env, ("hog", 2, 400, True))
        wait_for(lambda: counts(env, "done").get(2), 60, what="the killed job, run again")
        kills = journal(env, "kill")
        assert len(kills) == 1
        assert [j["job_id"] for j in kills[0]["in_flight"]] == [hog]
        assert counts(env, "done") == {1: 1, 2: 1}
        r = redis.Redis.from_url(URL)
        prefix = f"memwarden:arq:{env['ARQ_TEST_QUEUE']}:kills"
        assert r.get(f"{prefix}:{ended}") is None  # not counted towards poison
        assert r.get(f"{prefix}:{hog}") == b"1"


def test_job_in_flight_at_a_kernel_oom_kill_comes_back(tmp_path: Path) -> None:
    """The kernel's OOM killer (not memwarden) kills the worker in the middle of a job: the
    next worker runs the job again as it starts, not ``job_timeout`` + 10 s later; a job
    OOM-killed every time is quarantined after K kills, with a failed result."""
    need_service("Redis", 6379)
    settings = {
        "MEMWARDEN_MEASURE": "tree",
        "MEMWARDEN_SOFT_LIMIT": "3GiB",
        "MEMWARDEN_HARD_LIMIT": "4GiB",
        "MEMWARDEN_POISON_KILLS": str(POISON_KILLS),
    }
    r = redis.Redis.from_url(URL)
    with (
        arq_env(tmp_path, **settings) as env,
        memory_cgroup(300 * MB) as cg,
        WorkerLoop(ARQ_WORKER, env, tmp_path / "worker.log", cg),
    ):
        wait_for(lambda: journal(env, "sample"), 60, what="the worker's watchdog")
        enqueue(env, ("hog", 1, 400, True))
        wait_for(lambda: counts(env, "done").get(1), 45, what="the OOM-killed job again")
        (poison,) = enqueue(env, ("hog", 2, 400))
        quarantine = f"memwarden:arq:{env['ARQ_TEST_QUEUE']}:quarantine"
        wait_for(lambda: r.llen(quarantine), 90, what="the poison job quarantined")
        enqueue(env, ("work", 3))
        wait_for(lambda: counts(env, "done").get(3), 60, what="the queue to go on")
        oom_kills = cg.oom_kills()
        assert counts(env, "attempts") == {1: 2, 2: POISON_KILLS, 3: 1}
        assert oom_kills >= 1 + POISON_KILLS
        assert journal(env, "kill") == []  # the kernel's kills, not memwarden's
        quarantined = journal(env, "quarantine")
        assert [(q["job_id"], q["kills"]) for q in quarantined] == [(poison, POISON_KILLS)]
        assert [c["by"] for c in journal(env, "requeue")] == ["rescue"] * POISON_KILLS
        assert [p for r in journal(env) for p in problems(r)] == []  # the journal's schema
