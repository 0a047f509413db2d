"""Huey with **default memwarden settings** (only the cgroup's limit): a consumer that grows
fast (~100 MiB/s from concurrent tasks keeping 2–8 MiB) or slowly (~2 MiB/s) is met
gracefully — thread workers drained and restarted, process workers' children recycled —
never hard-killed, never OOM-killed by the kernel; every task runs exactly once.

The real ``huey_consumer`` (2 workers) in a real memory cgroup, restarted by a loop as a
platform would; Redis DB 5. One task in two keeps one big (mmap'd) buffer, the others small
heap objects.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from apps.huey_harness import consumer_argv, counts, huey_env, journal, producer
from apps.rq_harness import WorkerLoop
from cgroups import memory_cgroup
from conftest import need_service, wait_for

pytestmark = pytest.mark.slow

#: (worker type, cgroup bytes, tasks, MiB each task keeps (low, high), I/O seconds)
CASES = {
    "fast-thread": ("thread", 512 * 10**6, 240, (2.0, 8.0), 0.1),
    "fast-process": ("process", 512 * 10**6, 240, (2.0, 8.0), 0.1),
    "slow-thread": ("thread", 160 * 10**6, 120, (1.0, 1.0), 0.8),
    "slow-process": ("process", 192 * 10**6, 120, (1.0, 1.0), 0.8),
}
#: The remedies that are graceful for each worker type.
GRACEFUL = {"thread": {"signal"}, "process": {"recycle", "leave"}}


def restarts_made(records: list[dict]) -> int:
    """Restarts decided and not called off (the core calls one off when the jobs in hand
    ended back under the soft limit)."""
    made = sum(1 for r in records if r["event"] == "restart" and r["action"] == "signal")
    return made - sum(1 for r in records if r["event"] == "restart_called_off")


@pytest.mark.parametrize("case", list(CASES))
def test_growing_consumer_is_met_gracefully(tmp_path: Path, case: str) -> None:
    need_service("Redis", 6379)
    worker_type, limit, count, sizes, io_s = CASES[case]
    rnd = random.Random(13)
    log = tmp_path / "consumer.log"
    with (
        huey_env(tmp_path) as env,
        memory_cgroup(limit) as cg,
        WorkerLoop(consumer_argv(worker_type, 2), env, log, cg) as loop,
    ):
        app = producer(env)
        for n in range(count):
            app.keep(n, round(rnd.uniform(*sizes), 1), io_s, n % 2 == 1)
        try:
            wait_for(lambda: len(counts(env, "done")) == count, 300, 0.2, "every task done")
        except AssertionError:
            print(log.read_text()[-6000:])
            raise
        if worker_type == "thread":  # each restart not called off ends its consumer
            wait_for(
                lambda: len(loop.exits) >= restarts_made(journal(env)),
                60,
                what="each drained consumer to exit and come back",
            )
        oom_kills = cg.oom_kills()
        done, attempts = counts(env, "done"), counts(env, "attempts")
        records = journal(env)
    remedies = [r for r in records if r["event"] == "restart"]
    kills = [r for r in records if r["event"] == "kill"]
    assert kills == [] and oom_kills == 0, kills
    assert remedies and {r["action"] for r in remedies} <= GRACEFUL[worker_type], remedies
    assert {n: v for n, v in done.items() if v != 1} == {}
    assert {n: v for n, v in attempts.items() if v != 1} == {}  # none cut and run again
    assert set(loop.exits) <= {0}  # the consumer's own clean shutdown, every time
    print(f"{case}: {len(remedies)} graceful remedies, exits {loop.exits}")
