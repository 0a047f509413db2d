"""Huey under memwarden, end to end: a real ``huey_consumer``, real Redis, real growth.

Each test runs the consumer in its own session under a tiny supervisor (the dyno manager's
part: start it again when it exits) and counts every finished task in Redis, so "no task
lost" is checked, not assumed.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from tests.conftest import QUICK_LADDER, need_service, wait_for
from tests.supervised import Supervised

from apps.huey_harness import APPS, CONSUMER, URL, counts, journal, producer
from apps.huey_harness import huey_env as harness_env

#: Greenlet workers need gevent's monkey-patching before anything else is imported.
GEVENT_CONSUMER = [
    sys.executable,
    "-c",
    "from gevent import monkey; monkey.patch_all()\n"
    "from huey.bin.huey_consumer import consumer_main; consumer_main()",
]


def consumer(worker_type: str) -> list[str]:
    if worker_type != "greenlet":
        return [CONSUMER]
    if importlib.util.find_spec("gevent") is None:
        pytest.skip("greenlet workers need gevent (in the dev extra): pip install gevent")
    return GEVENT_CONSUMER


def consumer_argv(args: list[str]) -> list[str]:
    """The consumer command line for ``huey_consumer`` arguments ``args`` (``-k`` chosen)."""
    return [*consumer(args[args.index("-k") + 1]), "huey_app.huey", *args]


@pytest.fixture
def huey_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    need_service("Redis", 6379)
    with harness_env(tmp_path, **QUICK_LADDER) as env:
        yield env


def done(env: dict[str, str]) -> dict[int, float]:
    return counts(env, "done")


def attempts(env: dict[str, str], n: int) -> int:
    return int(counts(env, "attempts").get(n, 0))


def test_guard_rejects_a_bad_setting_and_starts_nothing_in_a_producer(
    huey_env: dict[str, str],
) -> None:
    from huey import RedisHuey

    from memwarden.huey import guard
    from memwarden.units import SettingError

    with pytest.raises(SettingError, match="MEMWARDEN_SOFT_LIMIT"):
        guard(RedisHuey(huey_env["HUEY_TEST_NAME"], url=URL), soft_limit="lots")
    app = producer(huey_env)
    app.work(1)  # enqueueing runs no warden here
    assert app.guard.warden is None


@pytest.mark.parametrize("worker_type", ["thread", "process", "greenlet"])
def test_interrupted_task_is_enqueued_again(huey_env: dict[str, str], worker_type: str) -> None:
    """SIGTERM is huey's "stop now": the running task is interrupted and huey has already
    taken it off the queue. The guard puts it back; the restarted consumer finishes it."""
    app = producer(huey_env)
    huey_env["MEMWARDEN_SOFT_LIMIT"] = "4GB"
    args = ["-k", worker_type, "-w", "1", "-c", "0.5"]
    log = Path(huey_env["MEMWARDEN_STATE_DIR"] + ".log")
    with Supervised(consumer_argv(args), huey_env, log, APPS) as sup:
        app.nap(1, 4.0)
        wait_for(lambda: attempts(huey_env, 1) == 1, 60, what="the task to start")
        first = sup.starts[0]
        os.kill(first, signal.SIGTERM)
        wait_for(lambda: done(huey_env).get(1), 60, what="the interrupted task to finish")
    assert attempts(huey_env, 1) == 2  # interrupted once, run again to the end
    assert done(huey_env) == {1: 1}
    assert len(sup.starts) >= 2 and sup.starts[0] == first


JOBS = 200
GROW_EVERY, GROW_MB = 4, 8  # 50 of the 200 jobs keep 8 MiB each: 400 MiB of real growth
#: The 200 jobs may all run in one burst before a recycle lands: ~120 MiB of workers plus
#: 400 MiB of growth, rising up to 900 MiB/s. The hard limit sits past that and past where
#: such a rise projects 0.1 s ahead, so only the hog crosses it.
HARD = "700MB"
HOG_MB = 800  # over the 700 MB hard limit, held for seconds: the watchdog must catch it


@pytest.mark.slow
@pytest.mark.parametrize(
    ("worker_type", "soft", "action"),
    [
        ("process", "150MB", "recycle"),
        ("thread", "120MB", "signal"),
        ("greenlet", "120MB", "signal"),
    ],
)
def test_200_growing_jobs_none_lost(
    huey_env: dict[str, str], worker_type: str, soft: str, action: str
) -> None:
    """Jobs that really grow the workers: memory-triggered recycles (process workers) or
    drains and restarts (thread workers), a mid-job hard-limit breach killed by the
    watchdog and run again, a poison job quarantined after two kills — and every other job
    finished at least once."""
    app = producer(huey_env)
    huey_env.update(MEMWARDEN_SOFT_LIMIT=soft, MEMWARDEN_HARD_LIMIT=HARD)
    args = ["-k", worker_type, "-w", "2", "-c", "0.5"]
    log = Path(huey_env["MEMWARDEN_STATE_DIR"] + ".log")
    once, poison = JOBS, JOBS + 1
    with Supervised(consumer_argv(args), huey_env, log, APPS) as sup:
        for n in range(JOBS):
            app.work(n, GROW_MB if n % GROW_EVERY == 0 else 0)
        wait_for(lambda: len(done(huey_env)) == JOBS, 120, 0.2, "the first 200 jobs")
        # One at a time: in a thread worker a kill takes every job in flight, and each of
        # them counts it (docs/huey.md: poison counting is per job in flight).
        app.hog(once, HOG_MB, first_only=True)
        wait_for(lambda: done(huey_env).get(once), 60, 0.2, "the killed job to run again")
        poison_task = app.hog.s(poison, HOG_MB)
        app.huey.enqueue(poison_task)
        quarantine = f"memwarden:huey:{huey_env['HUEY_TEST_NAME']}:quarantine"
        r = redis.Redis.from_url(URL)
        wait_for(lambda: r.llen(quarantine), 60, 0.2, "the poison job to be quarantined")
        app.work(poison + 1)  # the queue carries on
        wait_for(lambda: done(huey_env).get(poison + 1), 60, 0.2, "the job after the poison")
        assert r.llen(quarantine) == 1
    finished = done(huey_env)
    assert sorted(finished) == [*range(JOBS + 1), poison + 1], "a job was lost"
    assert all(finished[n] == 1 for n in range(JOBS)), "a drained job ran twice"
    assert poison not in finished
    assert attempts(huey_env, once) == 2  # killed at the hard limit, run again, finished
    assert attempts(huey_env, poison) == 2  # the two runs that were killed, then no more

    records = journal(huey_env)
    kills = [r for r in records if r["event"] == "kill"]
    assert len(kills) >= 3
    assert all("over hard limit" in k["reason"] for k in kills)
    assert all(any(j["job"] == "hog" for j in k["in_flight"]) for k in kills)
    restarts = [r for r in records if r["event"] == "restart" and r.get("action") == action]
    assert len(restarts) >= 2, f"{len(restarts)} memory-triggered {action}s"
    assert all("over soft limit" in r["reason"] for r in restarts)
    quarantined = [r for r in records if r["event"] == "quarantine"]
    assert [(q["job_id"], q["kills"]) for q in quarantined] == [(poison_task.id, 2)]
    jobs = [r for r in records if r["event"] == "job" and r["job"] == "work"]
    assert len(jobs) >= JOBS and all(j["framework"] == "huey" for j in jobs)
    if worker_type != "process":
        # Each restart not called off (the jobs in hand ended back under the soft limit:
        # the consumer goes on) and each kill ended the consumer, and it came back.
        called_off = sum(1 for r in records if r["event"] == "restart_called_off")
        assert len(sup.starts) >= len(restarts) - called_off + len(kills)
    else:
        assert len(sup.starts) == 1  # the consumer stayed; its children were replaced
