"""RQ with **default memwarden settings** (only the cgroup's limit): a worker that grows fast
(50–100 MiB/s) or slowly (~2 MiB/s) is restarted gracefully — intake stopped, the job in
hand finished, RQ's warm shutdown — never hard-killed, never OOM-killed by the kernel, and
every job runs exactly once.

The real ``rq worker`` CLI (``memwarden.rq.SimpleWorker``, and the forking ``Worker`` whose
parent grows between horses) in a real memory cgroup, restarted by a loop as a platform
would; Redis DB 3. Jobs keep 2–8 MiB (fast) or 1 MiB (slow), one in two as one big mmap'd
buffer, the others as small heap objects.
"""

from __future__ import annotations

import os
import random
import sys
import uuid
from pathlib import Path

import pytest
import redis
from rq import Queue

from apps.rq_harness import REDIS_URL, TESTS, WorkerLoop, forget, journal
from cgroups import memory_cgroup
from conftest import wait_for

RQ = str(Path(sys.executable).with_name("rq"))

pytestmark = pytest.mark.slow


def default_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No MEMWARDEN_* setting but where the journal and state go: the defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMWARDEN_", "RQ_"))}
    env.update(
        PYTHONPATH=str(TESTS),
        MWT_REDIS_URL=REDIS_URL,
        MEMWARDEN_JOURNAL=str(tmp_path / "journal.jsonl"),
        MEMWARDEN_STATE_DIR=str(tmp_path / "state"),
        **extra,
    )
    return env


#: (worker class, cgroup bytes, jobs, MiB each job keeps (low, high), job's I/O seconds,
#: what the parent keeps per job, least restarts)
FAST_SIMPLE = ("memwarden.rq.SimpleWorker", 512 * 10**6, 240, (2.0, 8.0), "0.05", "", 2)
FAST_FORKING = ("apps.rq_jobs.ParentGrowsWorker", 512 * 10**6, 240, (0.0, 0.0), "0", "2,8", 2)
SLOW_SIMPLE = ("memwarden.rq.SimpleWorker", 128 * 10**6, 120, (1.0, 1.0), "0.4", "", 1)
SLOW_FORKING = ("apps.rq_jobs.ParentGrowsWorker", 128 * 10**6, 120, (0.0, 0.0), "0.4", "1,1", 1)


@pytest.mark.parametrize(
    ("worker_class", "limit", "count", "sizes", "io_s", "parent_keeps", "least"),
    [FAST_SIMPLE, FAST_FORKING, SLOW_SIMPLE, SLOW_FORKING],
    ids=["fast-simple", "fast-forking", "slow-simple", "slow-forking"],
)
def test_growing_worker_is_restarted_gracefully(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    redis_url: str,
    worker_class: str,
    limit: int,
    count: int,
    sizes: tuple[float, float],
    io_s: str,
    parent_keeps: str,
    least: int,
) -> None:
    conn = redis.Redis.from_url(REDIS_URL)
    queue = Queue(f"mw-rq-defaults-{uuid.uuid4().hex[:10]}", connection=conn)
    prefix = f"mwt:{queue.name}"
    ids: list[str] = []
    request.addfinalizer(lambda: forget(conn, queue.name, ids))
    rnd = random.Random(13)
    for i in range(count):
        kind = "keep_big" if i % 2 else "keep"
        job = queue.enqueue("apps.rq_jobs.mw_job", prefix, kind, round(rnd.uniform(*sizes), 1))
        ids.append(job.id)
    extra = {"MWT_IO_S": io_s, **({"MWT_PARENT_KEEP": parent_keeps} if parent_keeps else {})}
    env = default_env(tmp_path, **extra)
    argv = [RQ, "worker", "-u", REDIS_URL, "-w", worker_class, queue.name]
    log = tmp_path / "worker.log"

    def all_done() -> bool:
        return conn.hlen(f"{prefix}:done") == count

    with memory_cgroup(limit) as cg, WorkerLoop(argv, env, log, cg) as loop:
        try:
            wait_for(all_done, timeout=240, interval=0.2, what="every job done")
        except AssertionError:
            print(log.read_text()[-6000:])
            raise
        oom_kills = cg.oom_kills()
    records = journal(tmp_path)
    restarts = [r for r in records if r["event"] == "restart" and r["action"] != "recycle"]
    kills = [r for r in records if r["event"] == "kill"]
    assert kills == [] and oom_kills == 0, kills
    assert len(restarts) >= least, restarts
    assert {r["action"] for r in restarts} == {"signal"}
    assert loop.exits and set(loop.exits) == {0}  # RQ's warm shutdown, every time
    done = {k.decode(): int(v) for k, v in conn.hgetall(f"{prefix}:done").items()}
    assert {i: n for i, n in done.items() if n != 1} == {}
    print(f"{len(restarts)} graceful restarts, exits {loop.exits}")
