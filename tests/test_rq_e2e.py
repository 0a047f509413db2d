"""RQ end to end: the real ``rq worker`` CLI with ``-w memwarden.rq.…``, real Redis (DB 3),
jobs that really grow memory, a restart loop standing in for ``rq worker-pool``/the dyno
manager, inside a real memory cgroup "dyno".

One run per worker class covers the acceptance list: 200+ jobs (some fragmenting or leaking
memory), the limits crossed several times with reclaims/recycles/restarts, a job that grows
past the hard limit mid-run is killed before it ends and completes on a fresh horse/worker,
a poison job is quarantined after K kills, every other job completes and none is left in the
started or failed registries.
"""

from __future__ import annotations

import collections
import json
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry

from apps.rq_harness import REDIS_URL, WorkerLoop, forget, journal, start_env
from cgroups import memory_cgroup
from conftest import wait_for
from memwarden.records import problems

MB = 1024 * 1024
RQ = str(Path(sys.executable).with_name("rq"))
POISON_KILLS = 3

pytestmark = pytest.mark.slow


def in_flight_ids(record: dict) -> set[str]:
    return {j.get("job_id") for j in record.get("in_flight", [])}


def run_scenario(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    worker_class: str,
    plan: list[tuple[str, int]],
    settle: Callable[[WorkerLoop], bool] | None = None,
    **settings: str,
):
    """Enqueue ``plan`` (kind, MiB) on a fresh queue, run the worker loop until every job but
    the poison one completed and the poison one is in the failed registry (and ``settle``
    holds for the loop)."""
    conn = redis.Redis.from_url(REDIS_URL)
    name = f"mw-rq-{uuid.uuid4().hex[:10]}"
    prefix = f"mwt:{name}"
    queue = Queue(name, connection=conn)
    jobs = [
        queue.enqueue("apps.rq_jobs.mw_job", prefix, kind, mb, job_timeout=180) for kind, mb in plan
    ]
    ids = {job.id: kind for job, (kind, _) in zip(jobs, plan, strict=True)}
    poison = [i for i, kind in ids.items() if kind == "hog"]
    others = [i for i, kind in ids.items() if kind != "hog"]
    failed = FailedJobRegistry(name, connection=conn)
    env = start_env(tmp_path, MEMWARDEN_POISON_KILLS=str(POISON_KILLS), **settings)
    argv = [RQ, "worker", "-u", REDIS_URL, "-w", worker_class, name]

    def finished() -> bool:
        done = {k.decode() for k in conn.hkeys(f"{prefix}:done")}
        return all(i in done for i in others) and all(p in failed for p in poison)

    request.addfinalizer(lambda: forget(conn, name, list(ids)))
    with memory_cgroup(1024 * MB) as cg, WorkerLoop(argv, env, tmp_path / "worker.log", cg) as loop:
        try:
            wait_for(finished, timeout=240, interval=0.2, what="every job done, poison failed")
            if settle is not None:
                wait_for(lambda: settle(loop), timeout=60, what="the worker loop to settle")
        except AssertionError:
            print((tmp_path / "worker.log").read_text()[-6000:])
            raise
        oom_kills = cg.oom_kills()
    result = {
        "conn": conn,
        "queue": queue,
        "ids": ids,
        "prefix": prefix,
        "failed": failed,
        "exits": list(loop.exits),
        "oom_kills": oom_kills,
        "records": journal(tmp_path),
        "runs": {k.decode(): int(v) for k, v in conn.hgetall(f"{prefix}:runs").items()},
        "done": {k.decode(): int(v) for k, v in conn.hgetall(f"{prefix}:done").items()},
        "ended": {k.decode(): int(v) for k, v in conn.hgetall(f"{prefix}:ended").items()},
        "pids": {i: [int(p) for p in conn.lrange(f"{prefix}:pids:{i}", 0, -1)] for i in ids},
    }
    return result


def plan_of(n_light: int, n_grow: int, grow: tuple[str, int], hog_mb: int) -> list:
    """Light jobs with growing ones spread through, one hog_once and one poison hog early."""
    plan: list[tuple[str, int]] = [("light", 0)] * n_light
    step = max(1, n_light // n_grow)
    for k in range(n_grow):
        plan.insert(k * (step + 1), grow)
    plan.insert(15, ("hog_once", hog_mb))
    plan.insert(40, ("hog", hog_mb))
    return plan


def check_common(res: dict) -> dict:
    """What both worker classes must show; returns the journal records by event."""
    ids, runs, done, ended = res["ids"], res["runs"], res["done"], res["ended"]
    by_event: dict[str, list[dict]] = collections.defaultdict(list)
    for r in res["records"]:
        by_event[r["event"]].append(r)
    assert [p for r in res["records"] for p in problems(r)] == []  # the journal's schema
    assert len(ids) >= 200
    # Every job but the poison one completed at least once; none lost.
    poison = next(i for i, k in ids.items() if k == "hog")
    once = next(i for i, k in ids.items() if k == "hog_once")
    assert [i for i in ids if i != poison and done.get(i, 0) < 1] == []
    # The mid-job breach: killed before it ended, came back once, completed on a fresh
    # process.
    assert ended.get(once, 0) == 0
    assert runs[once] == 2 and done[once] == 1
    first, second = res["pids"][once]
    assert first != second
    kills = [r for r in by_event["kill"] if once in in_flight_ids(r)]
    assert len(kills) == 1 and "over hard limit" in kills[0]["reason"]
    requeues = [r for r in by_event["requeue"] if r["job_id"] == once]
    assert len(requeues) == 1 and requeues[0]["kills"] == 1
    # The poison job: killed K times, never ended, quarantined with a clear reason.
    assert runs[poison] == POISON_KILLS and done.get(poison, 0) == 0
    assert ended.get(poison, 0) == 0
    assert poison in res["failed"]
    job = res["failed"].get_job_ids()
    assert job == [poison]
    from rq.job import Job

    exc = Job.fetch(poison, connection=res["conn"]).latest_result().exc_string
    assert "memwarden" in exc and f"{POISON_KILLS} hard kills" in exc
    assert len([r for r in by_event["kill"] if poison in in_flight_ids(r)]) == POISON_KILLS
    quarantined = by_event["quarantine"]
    assert [r["job_id"] for r in quarantined] == [poison]
    assert quarantined[0]["kills"] == POISON_KILLS and quarantined[0]["job"].endswith("mw_job")
    # Nothing left to rot: not started, not queued; the kernel never had to step in.
    started = StartedJobRegistry(res["queue"].name, connection=res["conn"])
    assert started.get_job_ids() == []
    assert res["queue"].count == 0
    assert res["oom_kills"] == 0
    # Per-job records with the job's name and id for every completed run.
    job_records = by_event["job"]
    recorded = {r["job_id"] for r in job_records}
    assert set(ids) - {poison} <= recorded
    assert all(r["framework"] == "rq" and r["job"] == "apps.rq_jobs.mw_job" for r in job_records)
    return by_event


def test_forking_worker(request, tmp_path, redis_url):
    """``memwarden.rq.Worker`` (a subclass whose parent also grows): horses that bloat are
    recycled with their job, a parent that grows is drained and restarted, a horse over the
    hard limit is killed alone and its job re-enqueued by the surviving parent."""
    plan = plan_of(180, 24, ("fragment", 120), 400)
    res = run_scenario(
        request,
        tmp_path,
        "apps.rq_jobs.ParentGrowsWorker",
        plan,
        MEMWARDEN_SOFT_LIMIT="100MiB",
        MEMWARDEN_HARD_LIMIT="300MiB",
        MWT_PARENT_LEAK_MB="15",
        MWT_PARENT_LEAK_EVERY="8",
    )
    by_event = check_common(res)
    once = next(i for i, k in res["ids"].items() if k == "hog_once")
    poison = next(i for i, k in res["ids"].items() if k == "hog")
    # Horse-only kills: the parent that reaped the horse re-enqueued the job.
    assert {r["by"] for r in by_event["requeue"]} == {"parent"}
    assert {r.get("target") for r in by_event["kill"]} == {"horse"}  # the record says so
    kill_pids = {r["pid"] for r in by_event["kill"]}
    parents = {r["worker_pid"] for r in by_event["job"]}
    assert kill_pids <= parents
    # ... and the kill did not end the worker: the hog_once's parent went on serving.
    killed_parent = next(r["pid"] for r in by_event["kill"] if once in in_flight_ids(r))
    assert any(
        r["worker_pid"] == killed_parent and r["ts"] > by_event["kill"][0]["ts"]
        for r in by_event["job"]
    )
    # Soft limit crossed several times: bloated horses recycled with their job, the growing
    # parent drained and restarted by its own signal (RQ's warm shutdown, exit status 0).
    recycles = [r for r in by_event["restart"] if r["action"] == "recycle"]
    restarts = [r for r in by_event["restart"] if r["action"] == "signal"]
    assert len(recycles) >= 3
    assert len(restarts) >= 2
    assert all(r["in_flight"] == [] or r["in_flight"][0]["job_id"] for r in restarts)
    assert len(by_event["reclaim"]) >= 1
    assert res["exits"].count(0) >= 2
    # Horse figures: its own RSS before/after and the peak from wait4, labelled as a peak.
    grown = [r for r in by_event["job"] if res["ids"][r["job_id"]] == "fragment"]
    assert grown and all(r["rss_after"] - r["rss_before"] > 40 * MB for r in grown)
    assert all(r["peak_rss"] >= r["rss_after"] - 4 * MB for r in grown)
    assert all(r["pid"] in res["pids"][r["job_id"]] for r in by_event["job"])  # the horse
    assert all(r["pid"] != r["worker_pid"] for r in by_event["job"])
    assert poison not in {r["job_id"] for r in by_event["job"]}


def test_simple_worker(request, tmp_path, redis_url):
    """``memwarden.rq.SimpleWorker``: jobs bloat the worker itself; reclaim, then drain and
    restart; over the hard limit the job is re-enqueued from ``before_kill`` and the whole
    worker is killed (and started again by the loop)."""
    plan = plan_of(180, 24, ("leak", 16), 400)
    for k in range(0, len(plan), 20):
        plan.insert(k, ("fragment", 60))
    res = run_scenario(
        request,
        tmp_path,
        "memwarden.rq.SimpleWorker",
        plan,
        MEMWARDEN_SOFT_LIMIT="110MiB",
        MEMWARDEN_HARD_LIMIT="300MiB",
        MEMWARDEN_GRACE="0.5",
        # The last poison kill may end the worker just after the job is quarantined.
        settle=lambda loop: loop.exits.count(-signal.SIGKILL) >= 1 + POISON_KILLS,
    )
    by_event = check_common(res)
    assert {r["by"] for r in by_event["requeue"]} == {"watchdog"}
    restarts = [r for r in by_event["restart"] if r["action"] == "signal"]
    assert len(restarts) >= 2
    assert len(by_event["reclaim"]) >= 2
    # Killed workers (SIGKILL, -9) for the hog_once and each poison run; clean restarts (0).
    assert res["exits"].count(-signal.SIGKILL) == 1 + POISON_KILLS
    assert res["exits"].count(0) >= 2
    # Job records come from the worker process itself, which ran the job.
    assert all(r["pid"] in res["pids"][r["job_id"]] for r in by_event["job"])
    print(json.dumps({"exits": res["exits"], "restarts": len(restarts)}))
