"""arq intake under memory pressure: a real ``arq`` worker (``max_jobs = 4``) in a real memory
cgroup on Redis starts no job over the soft limit and starts them again under it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from apps.arq_harness import ARQ_WORKER, URL, arq_env, counts, enqueue, journal
from apps.rq_harness import WorkerLoop
from cgroups import memory_cgroup
from conftest import need_service, wait_for

MB = 1024 * 1024

pytestmark = pytest.mark.slow


def test_big_job_pauses_intake_and_its_end_resumes_it(tmp_path: Path) -> None:
    """A job holds 150 MiB: over the soft limit the worker starts no other job though it
    has room for three more; once the job frees its memory the next one starts, in the
    same worker, with no restart."""
    need_service("Redis", 6379)
    settings = {
        "MEMWARDEN_MEASURE": "tree",
        "MEMWARDEN_SOFT_LIMIT": "100MiB",
        # At the job's 100 MiB/s the hard limit is more than grace + drain (9 s) away: only
        # intake is steered here, not the growth-aware restart.
        "MEMWARDEN_HARD_LIMIT": "1600MiB",
        "MEMWARDEN_GRACE": "8",
        "MEMWARDEN_SHUTDOWN_TIMEOUT": "1",
    }
    r = redis.Redis.from_url(URL)
    with (
        arq_env(tmp_path, **settings) as env,
        memory_cgroup(2048 * MB) as cg,
        WorkerLoop(ARQ_WORKER, env, tmp_path / "worker.log", cg) as loop,
    ):
        wait_for(lambda: journal(env, "sample"), 60, what="the worker's watchdog")
        enqueue(env, ("big", 1, 150))
        wait_for(lambda: counts(env, "peaked").get(1), 60, what="the big job to peak")
        enqueue(env, ("light", 2))
        # Over the soft limit the worker has room for the job: give it a poll or two.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and 2 not in counts(env, "started"):
            time.sleep(0.02)
        released = time.time()
        r.set(f"{env['ARQ_TEST_QUEUE']}:release:1", 1)
        wait_for(lambda: counts(env, "started").get(2), 60, what="the light job")
        oom_kills = cg.oom_kills()
        assert counts(env, "started")[2] > released, "a job started over the soft limit"
        pauses, resumes = journal(env, "pause"), journal(env, "resume")
        assert len(pauses) == 1 and len(resumes) == 1 and pauses[0]["ts"] < resumes[0]["ts"]
        assert journal(env, "kill") == [] and journal(env, "restart") == [] and oom_kills == 0
    assert loop.exits == []
