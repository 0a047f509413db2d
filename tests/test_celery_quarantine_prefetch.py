"""Celery's ``worker_disable_prefetch`` (Redis) and memwarden's quarantine of a poison task.

With prefetch disabled, Celery fetches only while its reserved tasks are fewer than the pool's
slots (``len(worker_state.reserved_requests) < concurrency``). A quarantined task never runs,
so it must leave the reserved set: left there, it holds a slot's worth of fetching for good.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery.result import AsyncResult
from tests.conftest import need_service
from tests.test_celery_e2e import RESULTS, Run
from tests.test_celery_e2e import run_factory as _run_factory

run_factory = _run_factory  # the harness's fixture, here too

MiB = 1024 * 1024


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_a_quarantined_task_leaves_the_fetch_its_slot(run_factory: Any, pool: str) -> None:
    """One slot, prefetch disabled: a task already at ``poison_kills`` kills is quarantined
    (FAILURE, not run); the task sent after it must then be fetched and run."""
    need_service("Redis", 6379)
    run: Run = run_factory(RESULTS, pool, quota=1024 * MiB, concurrency=1)
    argv = [*run.worker_argv(), "--disable-prefetch"]
    run.worker_argv = lambda: argv  # type: ignore[method-assign]
    with run.worker():
        # Sent with its kills already counted: the worker quarantines it on receipt.
        poison = str(uuid.uuid4())
        run.sent.append(poison)
        run.marks.set(f"memwarden:kills:{poison}", 2)
        run.app.send_task("mwt.tick", args=(1,), queue=run.queue, task_id=poison)
        result = AsyncResult(poison, app=run.app)
        run.wait(lambda: result.state == "FAILURE", 60, "the poison task's quarantine")
        after = run.send("mwt.tick", 1)
        run.wait(lambda: after in run.done(), 60, "the task sent after it to run")
    assert poison not in run.done()
    assert [q["job_id"] for q in run.records("quarantine")] == [poison]
