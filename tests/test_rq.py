"""RQ: the ``-w memwarden.rq.…`` names, settings, drain, and ``rq worker-pool`` restarting.

Real ``rq`` CLI processes on Redis DB 3; the big end-to-end runs are in test_rq_e2e.py.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import redis
import rq
from rq import Queue
from rq.utils import import_worker_class

import memwarden.rq
from apps.rq_harness import REDIS_URL, WorkerLoop, forget, journal, start_env
from cgroups import memory_cgroup
from conftest import wait_for

MB = 1024 * 1024
RQ = str(Path(sys.executable).with_name("rq"))


def test_worker_names_resolve_the_way_rq_resolves_them():
    worker = import_worker_class("memwarden.rq.Worker")
    simple = import_worker_class("memwarden.rq.SimpleWorker")
    assert worker is memwarden.rq.Worker and issubclass(worker, rq.Worker)
    assert simple is memwarden.rq.SimpleWorker and issubclass(simple, rq.SimpleWorker)
    assert not issubclass(simple, rq.Worker)  # no fork: jobs run in the worker itself


def test_poison_reason_names_memwarden_and_the_count():
    text = memwarden.rq.poison_reason(3, 3)
    assert text.startswith("memwarden:") and "3 hard kills" in text
    assert "MEMWARDEN_POISON_KILLS=3" in text


def test_bad_setting_stops_the_worker_naming_it(tmp_path, redis_url):
    env = start_env(tmp_path, MEMWARDEN_SOFT_LIMIT="lots")
    out = subprocess.run(
        [RQ, "worker", "-u", REDIS_URL, "-w", "memwarden.rq.Worker", "--burst", "mw-rq-bad"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "MEMWARDEN_SOFT_LIMIT='lots'" in out.stderr and "for example" in out.stderr


def _names(request: pytest.FixtureRequest, prefix: str) -> tuple[Queue, redis.Redis, list]:
    """A fresh queue on our Redis DB, and a list for the test's job ids: every key naming
    the queue or one of those jobs is deleted after the test."""
    conn = redis.Redis.from_url(REDIS_URL)
    queue = Queue(f"{prefix}-{uuid.uuid4().hex[:10]}", connection=conn)
    ids: list[str] = []
    request.addfinalizer(lambda: forget(conn, queue.name, ids))
    return queue, conn, ids


@pytest.mark.slow
def test_drain_finishes_the_job_takes_no_new_one_then_exits(request, tmp_path, redis_url):
    """Over the soft limit mid-job: the job finishes, the next one is left for the fresh
    worker, and the ``exit`` restart ends the drained worker with status 75."""
    queue, conn, ids = _names(request, "mw-rq-drain")
    prefix = f"mwt:{queue.name}"
    first = queue.enqueue("apps.rq_jobs.mw_job", prefix, "leak_until_restart", 150)
    second = queue.enqueue("apps.rq_jobs.mw_job", prefix, "light", 0)
    ids += [first.id, second.id]
    env = start_env(
        tmp_path,
        MEMWARDEN_SOFT_LIMIT="100MiB",
        MEMWARDEN_HARD_LIMIT="1GiB",
        MEMWARDEN_GRACE="0.3",
        MEMWARDEN_RESTART="exit",
    )
    argv = [RQ, "worker", "-u", REDIS_URL, "-w", "memwarden.rq.SimpleWorker", queue.name]
    with memory_cgroup(1024 * MB) as cg, WorkerLoop(argv, env, tmp_path / "w.log", cg) as loop:
        wait_for(lambda: conn.hexists(f"{prefix}:done", second.id), timeout=120, what="2nd job")
    assert loop.exits[:1] == [75]
    ran_first = [int(p) for p in conn.lrange(f"{prefix}:pids:{first.id}", 0, -1)]
    ran_second = [int(p) for p in conn.lrange(f"{prefix}:pids:{second.id}", 0, -1)]
    assert len(ran_first) == 1 and len(ran_second) == 1
    assert ran_first != ran_second  # the drained worker took no new job
    assert int(conn.hget(f"{prefix}:done", first.id)) == 1
    records = journal(tmp_path)
    restart = next(r for r in records if r["event"] == "restart")
    assert restart["action"] == "exit" and restart["pid"] == ran_first[0]
    assert [j["job_id"] for j in restart["in_flight"]] == [first.id]
    jobs = [r for r in records if r["event"] == "job"]
    assert [j["job_id"] for j in jobs] == [first.id, second.id]
    assert jobs[0]["rss_after"] - jobs[0]["rss_before"] >= 140 * MB


@pytest.mark.slow
def test_worker_pool_starts_restarted_workers_again(request, tmp_path, redis_url):
    """``rq worker-pool -w …``: a worker whose parent outgrows the soft limit drains and stops
    (RQ's warm shutdown); the pool starts a fresh one, which serves the next jobs."""
    queue, conn, ids = _names(request, "mw-rq-pool")
    prefix = f"mwt:{queue.name}"
    done = f"{prefix}:done"
    env = start_env(
        tmp_path,
        MEMWARDEN_SOFT_LIMIT="70MiB",
        MEMWARDEN_HARD_LIMIT="1GiB",
        MWT_PARENT_LEAK_MB="8",
        MWT_PARENT_LEAK_EVERY="2",
    )
    argv = [RQ, "worker-pool", "-u", REDIS_URL, "-n", "2"]
    argv += ["-w", "apps.rq_jobs.ParentGrowsWorker", queue.name]

    def restarted() -> set[int]:
        return {
            r["pid"]
            for r in journal(tmp_path)
            if r["event"] == "restart" and r["action"] == "signal"
        }

    with memory_cgroup(1024 * MB) as cg, open(tmp_path / "pool.log", "wb") as log:
        pool = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=cg.join)  # fmt: skip
        try:
            first = [queue.enqueue("apps.rq_jobs.mw_job", prefix, "light", 0) for _ in range(40)]
            ids += [j.id for j in first]
            wait_for(lambda: conn.hlen(done) == len(first), timeout=120, what="first batch")
            wait_for(restarted, timeout=60, what="a worker restarted by memwarden")
            gone = restarted()
            wait_for(lambda: not any(_is_rq(p) for p in gone), timeout=60, what="it stopped")
            # The second batch goes out once a worker the pool started after memwarden's first
            # restart waits for jobs (a worker over its soft limit with no job in hand restarts
            # at once, so such workers may have served the end of the first batch already).
            first_restart = min(r["ts"] for r in journal(tmp_path) if r["event"] == "restart")
            before = {r["pid"] for r in journal(tmp_path) if r["ts"] <= first_restart}
            wait_for(lambda: _idle_worker_besides(queue, before), timeout=60, what="a new worker")
            then = [queue.enqueue("apps.rq_jobs.mw_job", prefix, "light", 0) for _ in range(20)]
            ids += [j.id for j in then]
            total = len(first) + len(then)
            wait_for(lambda: conn.hlen(done) == total, timeout=120, what="second batch")
            # A job marks itself done in its horse; its record is written by the worker once
            # it has reaped that horse: stopping the pool before then would cut it.
            wanted = {j.id for j in first + then}
            wait_for(
                lambda: wanted <= {r["job_id"] for r in journal(tmp_path) if r["event"] == "job"},
                timeout=60,
                what="every job's record",
            )
        finally:
            pool.send_signal(signal.SIGTERM)
            try:
                pool.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pool.kill()
                pool.wait()
    records = [r for r in journal(tmp_path) if r["event"] == "job"]
    by_job = {r["job_id"]: r["worker_pid"] for r in records}
    early = {by_job[j.id] for j in first}
    late = {by_job[j.id] for j in then}
    assert gone <= early and not (late & gone)
    assert late - before  # a worker the pool started after memwarden stopped one
    assert {int(v) for v in conn.hvals(done)} == {1}  # each job ran once: nothing cut short


def _idle_worker_besides(queue: Queue, pids: set[int]) -> bool:
    """A worker of ``queue``, none of ``pids``, registered and waiting for a job."""
    return any(
        w.pid not in pids and w.get_state() == "idle"
        for w in rq.Worker.all(connection=queue.connection, queue=queue)
    )


def _is_rq(pid: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return "rq" in " ".join(psutil.Process(pid).cmdline())
    return False


@pytest.mark.parametrize("phase", ["freed", "zombie"])
def test_a_horse_letting_go_does_not_make_its_memory_the_parents(tmp_path, phase):
    """A tree reading counted the horse's 200 MiB; a moment later the horse has let them go
    (``freed``: alive and small; ``zombie``: exited, not yet reaped, its ``smaps_rollup``
    reads 0). The parent, small, is not judged over the soft limit for what the horse held:
    no restart (CI: ``test_forking_worker_is_not_restarted_for_what_its_horse_holds``
    restarted at 118 MiB as the 200 MiB horse let go)."""
    import os
    import types

    from memwarden import Warden
    from memwarden.gauges.proc import smaps_rollup

    own = smaps_rollup(os.getpid())
    assert own is not None
    soft = own.pss + 64 * 2**20
    warden = Warden(soft_limit=str(soft // 1024) + "KiB", hard_limit=str(soft // 512) + "KiB",
                    restart="none", state_dir=str(tmp_path))  # fmt: skip
    horse = os.fork()
    if horse == 0:
        if phase == "freed":
            time.sleep(60)
        os._exit(0)
    try:
        deadline = time.monotonic() + 30
        while phase == "zombie" and psutil.Process(horse).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        worker = types.SimpleNamespace(horse_pid=horse, warden=warden)
        total = soft + 200 * 2**20  # the reading that still counted the horse's 200 MiB
        Worker = memwarden.rq.Worker
        assert Worker._mw_horse_holds_it(worker, total)  # type: ignore[arg-type]
    finally:
        if phase == "freed":
            os.kill(horse, signal.SIGKILL)
        os.waitpid(horse, 0)
        warden.close()
