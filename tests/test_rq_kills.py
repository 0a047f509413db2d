"""RQ jobs at a kill: each job in flight at the instant comes back, within a bounded time, or
is quarantined after K kills; a job that ended before the instant is neither run again nor
counted towards poison.

Real ``rq worker`` CLI processes on Redis DB 3 in real memory cgroups, restarted by a loop
as a platform would. Kills by memwarden and by the kernel's OOM killer (memwarden's limits
set out of its reach).
"""

from __future__ import annotations

import http.server
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.webhook import Webhook

from apps.rq_harness import REDIS_URL, WorkerLoop, forget, journal, start_env
from cgroups import memory_cgroup
from conftest import wait_for

MB = 1024 * 1024
RQ = str(Path(sys.executable).with_name("rq"))
POISON_KILLS = 3

pytestmark = pytest.mark.slow

#: memwarden watching, its limits out of reach: the kernel's OOM killer acts alone.
KERNEL_KILLS = {"MEMWARDEN_SOFT_LIMIT": "3GiB", "MEMWARDEN_HARD_LIMIT": "4GiB"}


@contextmanager
def slow_webhook(seconds: float) -> Iterator[str]:
    """A local HTTP endpoint that answers each request ``seconds`` later: a slow webhook
    receiver, as RQ calls them once a job's end is recorded."""

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(seconds)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/done"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def rq_loop(
    request: pytest.FixtureRequest, tmp_path: Path, worker_class: str, limit: int, **settings: str
) -> Iterator[tuple[Queue, WorkerLoop, list[str]]]:
    conn = redis.Redis.from_url(REDIS_URL)
    queue = Queue(f"mw-rq-kills-{uuid.uuid4().hex[:10]}", connection=conn)
    ids: list[str] = []
    request.addfinalizer(lambda: forget(conn, queue.name, ids))
    env = start_env(tmp_path, MEMWARDEN_POISON_KILLS=str(POISON_KILLS), **settings)
    argv = [RQ, "worker", "-u", REDIS_URL, "-w", worker_class, queue.name]
    with memory_cgroup(limit) as cg, WorkerLoop(argv, env, tmp_path / "worker.log", cg) as loop:
        yield queue, loop, ids


def counts(conn: redis.Redis, prefix: str, what: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in conn.hgetall(f"{prefix}:{what}").items()}


def test_job_that_ended_before_the_kill_is_neither_run_again_nor_counted(
    request, tmp_path, redis_url
):
    """A job ends; while RQ calls its (slow) webhook, the worker goes over its hard limit
    and is killed. The job had finished: it is not re-enqueued, runs once, and no kill is
    counted against it; the kill record names no job."""
    with (
        slow_webhook(8.0) as url,
        rq_loop(
            request,
            tmp_path,
            "memwarden.rq.SimpleWorker",
            1024 * MB,
            MEMWARDEN_SOFT_LIMIT="100MiB",
            MEMWARDEN_HARD_LIMIT="300MiB",
            MEMWARDEN_MEASURE="cgroup",
        ) as (queue, _loop, ids),
    ):
        prefix = f"mwt:{queue.name}"
        conn = queue.connection
        job = queue.enqueue(
            "apps.rq_jobs.mw_job",
            prefix,
            "grow_after_end",
            400,
            webhooks=[Webhook(url, "finished", timeout=30)],
        )
        ids.append(job.id)
        after = queue.enqueue("apps.rq_jobs.mw_job", prefix, "light", 0)
        ids.append(after.id)
        wait_for(lambda: counts(conn, prefix, "done").get(after.id), 120, what="the next job")
        kills = [r for r in journal(tmp_path) if r["event"] == "kill"]
        assert len(kills) == 1 and kills[0]["in_flight"] == []
        assert counts(conn, prefix, "runs")[job.id] == 1
        assert Job.fetch(job.id, connection=conn).get_status() == "finished"
        assert conn.get(f"memwarden:kills:{job.id}") is None  # not counted towards poison
        assert [r for r in journal(tmp_path) if r["event"] == "requeue"] == []


@pytest.mark.parametrize("worker_class", ["memwarden.rq.Worker", "memwarden.rq.SimpleWorker"])
def test_job_in_flight_at_a_kernel_oom_kill_comes_back(request, tmp_path, redis_url, worker_class):
    """The kernel's OOM killer (not memwarden) kills the horse, or the whole SimpleWorker, in
    the middle of a job: the job comes back — re-enqueued by the surviving parent, or by
    the next worker as it starts — and completes; a job that is OOM-killed every time is
    quarantined after K kills, and no job is left in the started or failed registries."""
    with rq_loop(request, tmp_path, worker_class, 300 * MB, **KERNEL_KILLS) as (queue, loop, ids):
        prefix = f"mwt:{queue.name}"
        conn = queue.connection
        once = queue.enqueue("apps.rq_jobs.mw_job", prefix, "hog_once", 400, job_timeout=180)
        ids.append(once.id)
        wait_for(lambda: counts(conn, prefix, "done").get(once.id), 60, what="the job again")
        poison = queue.enqueue("apps.rq_jobs.mw_job", prefix, "hog", 400, job_timeout=180)
        ids.append(poison.id)
        failed = FailedJobRegistry(queue.name, connection=conn)
        wait_for(lambda: poison.id in failed, 120, what="the poison job quarantined")
        last = queue.enqueue("apps.rq_jobs.mw_job", prefix, "light", 0)
        ids.append(last.id)
        wait_for(lambda: counts(conn, prefix, "done").get(last.id), 60, what="the queue goes on")
        oom_kills = loop.cgroup.oom_kills()
    runs = counts(conn, prefix, "runs")
    assert runs[once.id] == 2 and runs[poison.id] == POISON_KILLS
    assert oom_kills >= 1 + POISON_KILLS
    assert failed.get_job_ids() == [poison.id]
    exc = Job.fetch(poison.id, connection=conn).latest_result().exc_string
    assert f"{POISON_KILLS} hard kills" in exc
    assert StartedJobRegistry(queue.name, connection=conn).get_job_ids() == []
    comebacks = [r for r in journal(tmp_path) if r["event"] == "requeue"]
    assert [r["job_id"] for r in comebacks] == [once.id] + [poison.id] * (POISON_KILLS - 1)
    # The parent that saw its horse OOM-killed, or the next worker finding the job abandoned.
    assert {r["by"] for r in comebacks} == {
        "oom_kill" if "Simple" not in worker_class else "rescue"
    }
