"""arq under memwarden, end to end: a real ``arq`` worker, real Redis, real growth.

The worker runs in its own session under a tiny supervisor (the dyno manager's part: start
it again when it exits); every finished job counts itself in Redis, so "no job lost" is
checked, not assumed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from arq.connections import RedisSettings, create_pool
from arq.jobs import Job
from arq.worker import JobExecutionFailed
from tests.conftest import QUICK_LADDER, need_service, wait_for
from tests.supervised import Supervised

from apps.arq_harness import APPS, ARQ_WORKER, DB, URL, counts, enqueue, journal
from apps.arq_harness import arq_env as harness_env


@pytest.fixture
def arq_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    need_service("Redis", 6379)
    with harness_env(tmp_path, **QUICK_LADDER) as env:
        yield env


def result_of(env: dict[str, str], job_id: str) -> Any:
    async def go() -> Any:
        pool = await create_pool(RedisSettings(host="127.0.0.1", port=6379, database=DB))
        try:
            job = Job(job_id, pool, _queue_name=env["ARQ_TEST_QUEUE"])
            return await job.result(timeout=10)
        finally:
            await pool.aclose()

    return asyncio.run(go())


def test_guard_rejects_a_bad_setting_and_keeps_the_users_hooks() -> None:
    from memwarden.arq import guard
    from memwarden.units import SettingError

    async def mine(ctx: dict[str, Any]) -> None:
        return None

    class Settings:
        functions: list[Any] = []
        on_job_start = mine

    with pytest.raises(SettingError, match="MEMWARDEN_HARD_LIMIT"):
        guard(Settings, hard_limit="-1GB")
    settings = {"functions": [], "after_job_end": mine}
    assert guard(settings) is settings
    assert settings["after_job_end"] is not mine and callable(settings["on_job_start"])


def test_restart_drains_a_running_job_to_its_end(arq_env: dict[str, str]) -> None:
    """Over the soft limit with a slow job running: the worker stops picking jobs, lets the
    job finish (one attempt, not cut and retried), then restarts; the queued job behind it
    runs in the next worker."""
    arq_env.update(MEMWARDEN_SOFT_LIMIT="150MB", MEMWARDEN_HARD_LIMIT="2GB")
    with Supervised(
        ARQ_WORKER, arq_env, Path(arq_env["MEMWARDEN_STATE_DIR"] + ".log"), APPS
    ) as sup:
        enqueue(arq_env, ("nap", 1, 3.0))
        wait_for(lambda: counts(arq_env, "attempts").get(1), 30, what="the slow job to start")
        enqueue(arq_env, ("work", 2, 150.0))  # pushes the worker over its soft limit
        wait_for(lambda: len(sup.starts) >= 2, 60, what="the restart")
        enqueue(arq_env, ("work", 3))
        wait_for(lambda: counts(arq_env, "done").keys() >= {1, 2, 3}, 60, what="all jobs")
    assert counts(arq_env, "attempts") == {1: 1, 2: 1, 3: 1}
    restarts = [r for r in journal(arq_env) if r["event"] == "restart"]
    assert restarts and restarts[0]["action"] == "signal"
    assert {"job": "nap"}.items() <= restarts[0]["in_flight"][0].items() or any(
        j["job"] == "nap" for r in restarts for j in r["in_flight"]
    )


JOBS = 200
GROW_EVERY, GROW_MB = 4, 8  # 50 of the 200 jobs keep 8 MiB each: 400 MiB of real growth
HOG_MB = 500  # over the 400 MB hard limit, held for seconds: the watchdog must catch it


@pytest.mark.slow
def test_200_growing_jobs_none_lost(arq_env: dict[str, str]) -> None:
    """Jobs that really grow the worker (four at a time): memory-triggered drains and
    restarts, a mid-job hard-limit breach killed by the watchdog and run again at once, a
    poison job quarantined after two kills with a failed result saying why — and every
    other job finished exactly once."""
    arq_env.update(MEMWARDEN_SOFT_LIMIT="150MB", MEMWARDEN_HARD_LIMIT="400MB")
    once, poison = JOBS, JOBS + 1
    quarantine = f"memwarden:arq:{arq_env['ARQ_TEST_QUEUE']}:quarantine"
    r = redis.Redis.from_url(URL)
    with Supervised(
        ARQ_WORKER, arq_env, Path(arq_env["MEMWARDEN_STATE_DIR"] + ".log"), APPS
    ) as sup:
        enqueue(arq_env, *[("work", n, GROW_MB if n % GROW_EVERY == 0 else 0) for n in range(JOBS)])
        wait_for(lambda: len(counts(arq_env, "done")) == JOBS, 120, 0.2, "the first 200 jobs")
        # One at a time: a kill counts against every job in flight (docs/arq.md).
        enqueue(arq_env, ("hog", once, HOG_MB, True))
        wait_for(lambda: counts(arq_env, "done").get(once), 60, 0.2, "the killed job again")
        (poison_id,) = enqueue(arq_env, ("hog", poison, HOG_MB))
        wait_for(lambda: r.llen(quarantine), 60, 0.2, "the poison job to be quarantined")
        enqueue(arq_env, ("work", poison + 1))  # the queue carries on
        wait_for(lambda: counts(arq_env, "done").get(poison + 1), 60, 0.2, "the next job")
    finished = counts(arq_env, "done")
    assert sorted(finished) == [*range(JOBS + 1), poison + 1], "a job was lost"
    assert all(finished[n] == 1 for n in range(JOBS)), "a drained job ran twice"
    tries = counts(arq_env, "attempts")
    assert tries[once] == 2 and tries[poison] == 2
    assert r.llen(quarantine) == 1
    with pytest.raises(JobExecutionFailed, match="2 hard kills: quarantined"):
        result_of(arq_env, poison_id)
    r.delete(f"arq:result:{poison_id}")

    records = journal(arq_env)
    kills = [k for k in records if k["event"] == "kill"]
    assert len(kills) == 3
    assert all("over hard limit" in k["reason"] for k in kills)
    assert all([j["job"] for j in k["in_flight"]] == ["hog"] for k in kills)
    restarts = [x for x in records if x["event"] == "restart" and x.get("action") == "signal"]
    assert len(restarts) >= 2, f"{len(restarts)} memory-triggered restarts"
    assert all("over soft limit" in x["reason"] for x in restarts)
    assert len(sup.starts) >= len(restarts) + len(kills)  # each one came back
    quarantined = [q for q in records if q["event"] == "quarantine"]
    assert [(q["job_id"], q["kills"]) for q in quarantined] == [(poison_id, 2)]
    jobs = [j for j in records if j["event"] == "job" and j["job"] == "work"]
    assert len(jobs) == JOBS + 1 and all(j["framework"] == "arq" for j in jobs)
    assert max(j["concurrent"] for j in jobs) > 1  # max_jobs = 4: attribution is shared
    hooks = r.mget(
        f"{arq_env['ARQ_TEST_QUEUE']}:user-hook-start", f"{arq_env['ARQ_TEST_QUEUE']}:user-hook-end"
    )
    assert (
        int(hooks[0] or 0) >= JOBS + 2 and int(hooks[1] or 0) >= JOBS + 1
    )  # the app's own hooks ran
