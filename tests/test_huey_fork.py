"""Huey's process workers are forked from the consumer and share its pages until they write
them. A reclaim in such a child (its ``gc.collect``) must not write the objects it inherited:
that copies the consumer's whole Python heap into the child, and the reclaim meant to give
memory back takes it instead — about 8 MiB a child, most of the gap between the soft and the
hard limit of a small quota (issue 13: two children's reclaims, then a hard kill with no task
in flight).

The real ``huey_consumer`` with one process worker in a real memory cgroup (its figure is
the cgroup's), an explicit soft limit well above the idle consumer and one task that keeps
an 80 MiB buffer, filled in one step under the GIL (the watchdog sees it before or after,
never growing): the child reclaims after it, over the soft limit. The watchdog reads once
a minute here, so that the reclaim is the after-task one (a watchdog's reclaim under way
when the task ends would leave it to the recycle, and the child could leave before it is
recorded).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from apps.huey_harness import consumer_argv, huey_env, journal, producer
from apps.rq_harness import WorkerLoop
from cgroups import memory_cgroup
from conftest import need_service, wait_for

MB = 1024 * 1024
#: What a reclaim may add to the cgroup's figure: gc's and the trim's own pages. Copying
#: the consumer's heap adds 8-12 MiB.
MOST_ADDED = 4 * MB

pytestmark = pytest.mark.slow


def test_a_reclaim_in_a_process_worker_does_not_copy_the_consumers_heap(tmp_path: Path) -> None:
    need_service("Redis", 6379)
    log = tmp_path / "consumer.log"
    with (
        huey_env(
            tmp_path,
            MEMWARDEN_SOFT_LIMIT="100MB",
            MEMWARDEN_INTERVAL="60s",
            MEMWARDEN_ALERT_INTERVAL="60s",
        ) as env,
        memory_cgroup(512 * 10**6) as cg,
        WorkerLoop(consumer_argv("process", 1), env, log, cg),
    ):
        producer(env).keep(0, 80.0, 0.0, True)
        try:
            wait_for(lambda: journal(env, "reclaim"), 120, 0.2, "the child's reclaim")
        except AssertionError:
            print(log.read_text()[-4000:])
            raise
        reclaim = journal(env, "reclaim")[0]
    added = reclaim["total_after"] - reclaim["total_before"]
    print(f"reclaim: {reclaim['total_before'] / MB:.1f} -> {reclaim['total_after'] / MB:.1f} MiB")
    assert reclaim["total_before"] >= 100 * 10**6, reclaim  # the cgroup's figure, over soft
    assert added < MOST_ADDED, reclaim
