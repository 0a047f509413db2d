"""RQ intake under memory pressure: paused over the soft limit, resumed under it, and no job
taken once intake stopped (a job a dequeue brings back then goes back to its queue).

Real ``rq worker`` CLI processes (``memwarden.rq.SimpleWorker`` and the forking ``Worker``)
on Redis DB 3, in a real memory cgroup, with jobs that really take memory.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from rq import Queue

from apps.rq_harness import REDIS_URL, WorkerLoop, forget, journal, start_env
from cgroups import TestCgroup, memory_cgroup
from conftest import wait_for

MB = 1024 * 1024
RQ = str(Path(sys.executable).with_name("rq"))

pytestmark = pytest.mark.slow

#: Over the soft limit a job in hand goes on and no new job starts. The hard limit sits far
#: enough that the jobs' 100 MiB/s would not reach it within grace + drain (4 s): only
#: intake is steered here, not the growth-aware restart.
LIMITS = {
    "MEMWARDEN_SOFT_LIMIT": "100MiB",
    "MEMWARDEN_HARD_LIMIT": "800MiB",
    "MEMWARDEN_GRACE": "3",
    "MEMWARDEN_SHUTDOWN_TIMEOUT": "1",
}
#: Where the worker is to restart: time for its warm shutdown on a busy machine (the drain
#: is instant, no job in hand), and growth slow enough (40 MiB/s) that the hard limit
#: stays further than grace + drain (13 s) away.
RESTARTING = {"MEMWARDEN_SHUTDOWN_TIMEOUT": "10", "MWT_GROW_RATE": "40"}


@dataclass
class Run:
    conn: redis.Redis
    queue: Queue
    prefix: str
    tmp_path: Path
    cg: TestCgroup | None = None
    loop: WorkerLoop | None = None
    ids: list[str] = field(default_factory=list)
    oom_kills: int = -1  # the cgroup's count, read as the run ends

    def enqueue(self, kind: str, mb: int = 0) -> str:
        job = self.queue.enqueue("apps.rq_jobs.mw_job", self.prefix, kind, mb, job_timeout=120)
        self.ids.append(job.id)
        return job.id

    def done(self, job_id: str) -> int:
        return int(self.conn.hget(f"{self.prefix}:done", job_id) or 0)

    def pids(self, job_id: str) -> list[int]:
        return [int(p) for p in self.conn.lrange(f"{self.prefix}:pids:{job_id}", 0, -1)]

    def records(self, event: str | None = None) -> list[dict]:
        return [r for r in journal(self.tmp_path) if event is None or r["event"] == event]

    def wait(self, condition: Callable[[], object], what: str, timeout: float = 120) -> None:
        try:
            wait_for(condition, timeout=timeout, interval=0.05, what=what)
        except AssertionError:
            print((self.tmp_path / "worker.log").read_text()[-6000:])
            raise


@contextmanager
def rq_run(
    request: pytest.FixtureRequest, tmp_path: Path, worker_class: str, **settings: str
) -> Iterator[Run]:
    """A fresh queue and a restart loop of ``rq worker -w worker_class`` in a 1 GiB cgroup."""
    conn = redis.Redis.from_url(REDIS_URL)
    queue = Queue(f"mw-rq-intake-{uuid.uuid4().hex[:10]}", connection=conn)
    run = Run(conn, queue, f"mwt:{queue.name}", tmp_path)
    request.addfinalizer(lambda: forget(conn, queue.name, run.ids))
    env = start_env(tmp_path, **{**LIMITS, **settings})
    argv = [RQ, "worker", "-u", REDIS_URL, "-w", worker_class, queue.name]
    with memory_cgroup(1024 * MB) as cg, WorkerLoop(argv, env, tmp_path / "worker.log", cg) as loop:
        run.cg, run.loop = cg, loop
        yield run
        run.oom_kills = cg.oom_kills()


def graceful_only(run: Run) -> None:
    """No kill by memwarden, none by the kernel."""
    assert run.records("kill") == []
    assert run.oom_kills == 0


@pytest.mark.parametrize("worker_class", ["memwarden.rq.SimpleWorker", "memwarden.rq.Worker"])
def test_big_job_pauses_intake_and_its_end_resumes_it(request, tmp_path, redis_url, worker_class):
    """A job holds 150 MiB for a while, then frees them: over the soft limit the worker takes
    no new job (pause) and once the job has given its memory back it takes the next one
    (resume) — the same worker, no restart."""
    with rq_run(request, tmp_path, worker_class) as run:
        big = run.enqueue("hold", 150)
        light = run.enqueue("light")
        run.wait(lambda: run.done(light), "the light job after the big one")
        # The forking worker's parent writes a job's record once the horse has ended: stop
        # the worker only after that (the job's own mark comes a moment before).
        run.wait(lambda: len(run.records("job")) == 2, "both job records")
    assert run.done(big) == 1 and run.done(light) == 1
    pauses, resumes = run.records("pause"), run.records("resume")
    assert len(pauses) == 1 and len(resumes) == 1
    assert pauses[0]["ts"] < resumes[0]["ts"]
    assert [r["action"] for r in run.records("restart") if r["action"] != "recycle"] == []
    assert run.loop is not None and run.loop.exits == []  # the worker never stopped
    # The light job started once intake resumed: its record is written at its end.
    light_record = next(r for r in run.records("job") if r["job_id"] == light)
    assert light_record["ts"] > resumes[0]["ts"]
    graceful_only(run)


def test_simple_worker_takes_no_job_while_over_the_soft_limit(request, tmp_path, redis_url):
    """A job keeps 150 MiB and ends: the worker, over its soft limit with no job in hand,
    takes no next job; it restarts at once and the next job runs in the fresh worker."""
    with rq_run(request, tmp_path, "memwarden.rq.SimpleWorker", **RESTARTING) as run:
        grower = run.enqueue("grow", 150)
        light = run.enqueue("light")
        run.wait(lambda: run.done(light), "the light job")
    (first,) = run.pids(grower)
    assert run.pids(light) != [first]  # not taken by the worker over its soft limit
    assert len(run.pids(light)) == 1
    (restart,) = [r for r in run.records("restart") if r["pid"] == first]
    assert restart["action"] == "signal" and "no job in hand" in restart["reason"]
    assert [p["pid"] for p in run.records("pause")][:1] == [first]
    graceful_only(run)


def test_forking_worker_checks_before_it_takes_a_job(request, tmp_path, redis_url):
    """The forking worker's parent grows 150 MiB after a job: before its next dequeue it
    judges its memory, takes no job and restarts; the next job runs in the fresh worker."""
    with rq_run(
        request,
        tmp_path,
        "apps.rq_jobs.ParentGrowsWorker",
        MWT_PARENT_LEAK_MB="150",
        MWT_PARENT_LEAK_EVERY="1",
        **RESTARTING,
    ) as run:
        first_job = run.enqueue("light")
        second_job = run.enqueue("light")
        run.wait(lambda: run.done(second_job), "the second job")
        run.wait(lambda: len(run.records("job")) == 2, "both job records")
    by_job = {r["job_id"]: r["worker_pid"] for r in run.records("job")}
    assert by_job[first_job] != by_job[second_job]
    (restart,) = [r for r in run.records("restart") if r["pid"] == by_job[first_job]]
    assert restart["action"] == "signal" and restart["in_flight"] == []
    graceful_only(run)


def test_forking_worker_is_not_restarted_for_what_its_horse_holds(request, tmp_path, redis_url):
    """A horse holds 200 MiB for longer than the grace, while its parent stays small: a
    restart of the parent would take nothing off (the horse's memory goes with its job), so
    none comes; the same parent serves the next job once the horse has ended."""
    with rq_run(request, tmp_path, "memwarden.rq.Worker", MWT_HOLD_S="6", **RESTARTING) as run:
        big = run.enqueue("hold_for", 200)
        light = run.enqueue("light")
        run.wait(lambda: run.done(light), "the light job")
        run.wait(lambda: len(run.records("job")) == 2, "both job records")
    by_job = {r["job_id"]: r["worker_pid"] for r in run.records("job")}
    assert by_job[big] == by_job[light]
    assert [r for r in run.records("restart") if r["action"] != "recycle"] == []
    assert run.loop is not None and run.loop.exits == []
    graceful_only(run)


def test_job_dequeued_after_intake_stopped_goes_back(request, tmp_path, redis_url):
    """An idle worker inside a blocking dequeue when memory goes over the soft limit (another
    process of its cgroup takes 150 MiB): it stops intake and restarts; a job pushed in that
    moment, popped by the dequeue already under way, goes back to the queue and runs once,
    in the fresh worker."""
    with rq_run(
        request, tmp_path, "memwarden.rq.SimpleWorker", MEMWARDEN_MEASURE="cgroup", **RESTARTING
    ) as run:
        run.wait(lambda: run.records("sample"), "the worker to watch")
        assert run.cg is not None
        hog = subprocess.Popen(
            [sys.executable, "-c", TAKE_150_MIB], stdout=subprocess.PIPE, preexec_fn=run.cg.join
        )
        try:
            run.wait(lambda: run.records("restart"), "the idle worker's restart")
            job = run.enqueue("light")
        finally:
            hog.kill()
            hog.wait()
        run.wait(lambda: run.done(job), "the job pushed as intake stopped")
    (restart,) = run.records("restart")
    assert restart["action"] == "signal" and restart["in_flight"] == []
    assert run.pids(job) != [restart["pid"]] and len(run.pids(job)) == 1
    assert run.records("kill") == []


TAKE_150_MIB = "import time\nb = b'\\x07' * (150 << 20)\ntime.sleep(600)\n"


def test_a_stop_as_the_worker_turns_idle_still_records_the_job(request, tmp_path, redis_url):
    """SIGTERM lands just after the horse is reaped, as RQ marks the worker idle (its
    handler then raises ``StopRequested`` at once): the job's record is still written, and
    the worker stops cleanly (warm shutdown, status 0), not restarted by us."""
    with rq_run(request, tmp_path, "apps.rq_jobs.StoppedAsItIdlesWorker") as run:
        job = run.enqueue("light")
        run.wait(lambda: run.loop is not None and run.loop.exits, "the worker to stop")
        assert run.loop is not None
        assert run.loop.exits[0] == 0
    assert run.done(job) == 1
    assert [r["job_id"] for r in run.records("job")] == [job]
    graceful_only(run)
