"""arq with **default memwarden settings** (only the cgroup's limit): a worker that grows fast
(~100 MiB/s from four concurrent jobs keeping 2–8 MiB) or slowly (~2 MiB/s) is drained and
restarted — never hard-killed, never OOM-killed by the kernel; every job runs exactly once
(none cut by the restart and tried again).

The real ``arq`` CLI (``max_jobs = 4``) in a real memory cgroup, restarted by a loop as a
platform would; Redis DB 6. One job in two keeps one big (mmap'd) buffer, the others small
heap objects.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from apps.arq_harness import ARQ_WORKER, arq_env, counts, enqueue, journal
from apps.rq_harness import WorkerLoop
from cgroups import memory_cgroup
from conftest import need_service, wait_for

pytestmark = pytest.mark.slow

#: (cgroup bytes, jobs, MiB each job keeps (low, high), I/O seconds)
CASES = {
    "fast": (512 * 10**6, 240, (2.0, 8.0), 0.2),
    "slow": (128 * 10**6, 120, (1.0, 1.0), 2.0),
}


def restarts_made(records: list[dict]) -> int:
    made = sum(1 for r in records if r["event"] == "restart")
    return made - sum(1 for r in records if r["event"] == "restart_called_off")


@pytest.mark.parametrize("case", list(CASES))
def test_growing_worker_is_restarted_gracefully(tmp_path: Path, case: str) -> None:
    need_service("Redis", 6379)
    limit, count, sizes, io_s = CASES[case]
    rnd = random.Random(13)
    log = tmp_path / "worker.log"
    with (
        arq_env(tmp_path) as env,
        memory_cgroup(limit) as cg,
        WorkerLoop(ARQ_WORKER, env, log, cg) as loop,
    ):
        jobs = [("keep", n, round(rnd.uniform(*sizes), 1), io_s, n % 2 == 1) for n in range(count)]
        enqueue(env, *jobs)
        try:
            wait_for(lambda: len(counts(env, "done")) == count, 300, 0.2, "every job done")
        except AssertionError:
            print(log.read_text()[-6000:])
            raise
        # Each restart not called off (the core calls one off when the jobs in hand ended
        # back under the soft limit) ends its worker, and the loop starts it again.
        wait_for(
            lambda: len(loop.exits) >= restarts_made(journal(env)),
            60,
            what="each drained worker to exit and come back",
        )
        oom_kills = cg.oom_kills()
        done, attempts = counts(env, "done"), counts(env, "attempts")
        records = journal(env)
    restarts = [r for r in records if r["event"] == "restart"]
    kills = [r for r in records if r["event"] == "kill"]
    assert kills == [] and oom_kills == 0, kills
    assert restarts and {r["action"] for r in restarts} == {"signal"}, restarts
    assert {n: v for n, v in done.items() if v != 1} == {}
    assert {n: v for n, v in attempts.items() if v != 1} == {}  # none cut and run again
    assert set(loop.exits) <= {0}  # arq's own clean shutdown, every time
    print(f"{case}: {len(restarts)} graceful restarts, exits {loop.exits}")
