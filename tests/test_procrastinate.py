"""Procrastinate under memwarden: real PostgreSQL, real ``procrastinate worker`` processes
in a real memory cgroup, restarted by a loop as a platform would.

A job killed at the hard limit is back at once; a job running at K kills is quarantined
(status ``failed``, its row in memwarden's table); a job cut by a kill memwarden did not
make (SIGKILL from outside, the kernel's OOM killer) is back once its worker's heartbeat is
stale (Procrastinate alone leaves it ``doing`` for good), or quarantined after K; intake
pauses over the soft limit.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from apps import harness
from apps.harness import journal
from apps.rq_harness import WorkerLoop
from cgroups import memory_cgroup
from conftest import need_service, wait_for
from memwarden.integrations.procrastinate import guard, no_loss_problems
from memwarden.records import problems

MB = 1024 * 1024
POISON_KILLS = 2
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
APPS = Path(__file__).resolve().parent / "apps"
WORKER = [
    str(Path(sys.executable).with_name("procrastinate")),
    "--app=procrastinate_app.app",
    "worker",
]

pytestmark = pytest.mark.slow


@pytest.fixture
def dsn() -> Iterator[str]:
    """A database of this test's own, with Procrastinate's schema; dropped afterwards."""
    need_service("PostgreSQL", 5432)
    name = f"mw_procrastinate_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        from procrastinate import App, PsycopgConnector

        app = App(connector=PsycopgConnector(conninfo=url))
        with app.open():
            app.schema_manager.apply_schema()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE mwt_jobs (n int PRIMARY KEY, runs int NOT NULL DEFAULT 0,"
                " done int NOT NULL DEFAULT 0, released bool NOT NULL DEFAULT false)"
            )
        yield url
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def worker_env(tmp_path: Path, dsn: str, **settings: str) -> dict[str, str]:
    defaults = {
        "MWT_PG_DSN": dsn,
        "MEMWARDEN_MEASURE": "tree",
        "MEMWARDEN_INTERVAL": "0.1",
        "MEMWARDEN_POISON_KILLS": str(POISON_KILLS),
    }
    return harness.worker_env(tmp_path, [APPS], **{**defaults, **settings})


def defer(dsn: str, task: str, **kwargs: Any) -> int:
    from procrastinate import App, PsycopgConnector

    app = App(connector=PsycopgConnector(conninfo=dsn))
    with app.open():
        return int(app.configure_task(task).defer(**kwargs))


def rows(dsn: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()  # type: ignore[arg-type]


def counts(dsn: str, n: int) -> tuple[int, int]:
    found = rows(dsn, "SELECT runs, done FROM mwt_jobs WHERE n = %s", n)
    return (found[0][0], found[0][1]) if found else (0, 0)


def status(dsn: str, job_id: int) -> str:
    return str(rows(dsn, "SELECT status FROM procrastinate_jobs WHERE id = %s", job_id)[0][0])


def test_job_killed_at_the_hard_limit_comes_back(tmp_path: Path, dsn: str) -> None:
    """A job takes the worker over the hard limit: memwarden kills the worker, the job is
    back to ``todo`` at once (one kill counted), the next worker runs it to the end once."""
    env = worker_env(
        tmp_path, dsn, MEMWARDEN_SOFT_LIMIT="150MiB", MEMWARDEN_HARD_LIMIT="300MiB",
        MEMWARDEN_GRACE="60",
    )  # fmt: skip
    with memory_cgroup(1024 * MB) as cg, WorkerLoop(WORKER, env, tmp_path / "w.log", cg) as loop:
        wait_for(lambda: journal(env, "sample"), 60, what="the worker's watchdog")
        job = defer(dsn, "hog", n=1, mb=400, first_only=True)
        wait_for(lambda: counts(dsn, 1)[1], 90, what="the killed job, run again")
        kills = journal(env, "kill")
        assert len(kills) == 1
        assert [j["job_id"] for j in kills[0]["in_flight"]] == [str(job)]
        assert counts(dsn, 1) == (2, 1)
        assert status(dsn, job) == "succeeded"
        assert rows(dsn, "SELECT kills, quarantined_at FROM memwarden_procrastinate_kills") == [
            (1, None)
        ]
        assert loop.exits, "the killed worker was restarted"


def test_poison_job_is_quarantined_after_k_kills(tmp_path: Path, dsn: str) -> None:
    """A job that takes the worker over the hard limit every run is killed K times, then
    quarantined: ``failed``, its reason in memwarden's table and journal; the jobs beside
    it all run."""
    env = worker_env(
        tmp_path, dsn, MEMWARDEN_SOFT_LIMIT="150MiB", MEMWARDEN_HARD_LIMIT="300MiB",
        MEMWARDEN_GRACE="60",
    )  # fmt: skip
    with memory_cgroup(1024 * MB) as cg, WorkerLoop(WORKER, env, tmp_path / "w.log", cg):
        poison = defer(dsn, "hog", n=1, mb=400, rate=200)
        others = [defer(dsn, "nap", n=n, seconds=0.1) for n in range(2, 8)]
        wait_for(lambda: journal(env, "quarantine"), 180, what="the quarantine")
        wait_for(lambda: all(counts(dsn, n)[1] for n in range(2, 8)), 90, what="the others")
        (q,) = journal(env, "quarantine")
        assert q["job_id"] == str(poison) and q["kills"] == POISON_KILLS
        assert q["framework"] == "procrastinate"
        kills = journal(env, "kill")
        assert len(kills) == POISON_KILLS
        assert all(str(poison) in [j["job_id"] for j in k["in_flight"]] for k in kills)
        assert status(dsn, poison) == "failed"
        assert counts(dsn, 1) == (POISON_KILLS, 0)
        table = rows(
            dsn, "SELECT job_id, kills, reason FROM memwarden_procrastinate_kills"
            " WHERE quarantined_at IS NOT NULL"
        )  # fmt: skip
        assert [(r[0], r[1]) for r in table] == [(poison, POISON_KILLS)]
        assert "quarantined by memwarden" in table[0][2]
        assert all(status(dsn, j) == "succeeded" for j in others)
        assert [p for r in journal(env) for p in problems(r)] == []  # the journal's schema


def test_job_of_a_worker_killed_from_outside_comes_back(tmp_path: Path, dsn: str) -> None:
    """SIGKILL from outside (as the kernel's OOM killer would) in the middle of a job: the
    next worker finds it ``doing`` on a worker whose heartbeat is stale and runs it again
    (one kill counted, a ``requeue`` record by ``rescue``)."""
    env = worker_env(tmp_path, dsn, MEMWARDEN_SOFT_LIMIT="3GiB", MEMWARDEN_HARD_LIMIT="4GiB")
    with memory_cgroup(1024 * MB) as cg, WorkerLoop(WORKER, env, tmp_path / "w.log", cg) as loop:
        job = defer(dsn, "nap", n=1, seconds=600)
        wait_for(lambda: counts(dsn, 1)[0] == 1, 60, what="the job's start")
        first = loop.current
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        wait_for(lambda: counts(dsn, 1)[0] == 2, 60, what="the job, run again")
        assert status(dsn, job) == "doing"
        (requeue,) = journal(env, "requeue")
        assert requeue["job_id"] == str(job) and requeue["by"] == "rescue"
        assert requeue["kills"] == 1
        assert loop.exits == [-signal.SIGKILL]
        assert [p for r in journal(env) for p in problems(r)] == []


def test_jobs_cut_by_the_kernels_oom_killer_come_back_or_are_quarantined(
    tmp_path: Path, dsn: str
) -> None:
    """memwarden's limits out of reach: the kernel's OOM killer kills the worker in the
    middle of a job. The next worker finds the job ``doing`` on a dead worker and runs it
    again; a job OOM-killed every run is quarantined after K kills and the queue goes on."""
    env = worker_env(tmp_path, dsn, MEMWARDEN_SOFT_LIMIT="3GiB", MEMWARDEN_HARD_LIMIT="4GiB")
    with memory_cgroup(300 * MB) as cg, WorkerLoop(WORKER, env, tmp_path / "w.log", cg):
        wait_for(lambda: journal(env, "sample"), 60, what="the worker's watchdog")
        once = defer(dsn, "hog", n=1, mb=400, first_only=True)
        wait_for(lambda: counts(dsn, 1)[1], 90, what="the OOM-killed job, run again")
        poison = defer(dsn, "hog", n=2, mb=400)
        wait_for(lambda: journal(env, "quarantine"), 120, what="the poison job quarantined")
        after = defer(dsn, "nap", n=3, seconds=0.1)
        wait_for(lambda: counts(dsn, 3)[1], 60, what="the queue to go on")
        assert cg.oom_kills() >= 1 + POISON_KILLS
        assert journal(env, "kill") == []  # the kernel's kills, not memwarden's
        assert [counts(dsn, n) for n in (1, 2, 3)] == [(2, 1), (POISON_KILLS, 0), (1, 1)]
        assert [(q["job_id"], q["kills"]) for q in journal(env, "quarantine")] == [
            (str(poison), POISON_KILLS)
        ]
        requeued = [(r["job_id"], r["by"]) for r in journal(env, "requeue")]
        assert requeued == [(str(once), "rescue")] + [(str(poison), "rescue")] * (POISON_KILLS - 1)
        assert [status(dsn, j) for j in (once, poison, after)] == [
            "succeeded",
            "failed",
            "succeeded",
        ]
        assert [p for r in journal(env) for p in problems(r)] == []


def test_intake_pauses_over_the_soft_limit(tmp_path: Path, dsn: str) -> None:
    """A big job takes memory over the soft limit: no job is fetched while it holds it
    (they stay ``todo``), all run once it lets go."""
    env = worker_env(
        tmp_path, dsn, MEMWARDEN_SOFT_LIMIT="150MiB", MEMWARDEN_HARD_LIMIT="900MiB",
        MEMWARDEN_GRACE="120",
    )  # fmt: skip
    with memory_cgroup(1024 * MB) as cg, WorkerLoop(WORKER, env, tmp_path / "w.log", cg):
        defer(dsn, "big", n=1, mb=200)
        wait_for(lambda: journal(env, "pause"), 60, what="intake paused")
        small = [defer(dsn, "nap", n=n, seconds=0.1) for n in range(2, 6)]
        # Four free job slots and a fetch every 0.5 s: unpaused, they would start at once.
        with pytest.raises(AssertionError):
            wait_for(lambda: any(counts(dsn, n)[0] for n in range(2, 6)), 5, what="a start")
        assert all(status(dsn, j) == "todo" for j in small)
        rows(dsn, "UPDATE mwt_jobs SET released = true WHERE n = 1 RETURNING n")
        wait_for(lambda: all(counts(dsn, n)[1] for n in range(1, 6)), 60, what="all jobs")
        assert journal(env, "resume") or journal(env, "restart")
        assert not journal(env, "kill")


def test_check_names_the_settings_that_can_lose_a_job() -> None:
    """``memwarden check --procrastinate-app``: an unguarded app, a graceful timeout with a
    task that does not retry, a heartbeat no faster than the stalled timeout; a guarded
    app on the defaults has none."""
    from procrastinate import App, PsycopgConnector

    risky = App(
        connector=PsycopgConnector(conninfo=ADMIN),
        worker_defaults={"shutdown_graceful_timeout": 5, "update_heartbeat_interval": 30},
    )

    @risky.task(name="once")
    def once() -> None: ...

    @risky.task(name="again", retry=3)
    def again() -> None: ...

    found = no_loss_problems(risky)
    assert len(found) == 3
    assert "not guarded" in found[0]
    assert "once" in found[1] and "again" not in found[1]
    assert "update_heartbeat_interval (30s) >= stalled_worker_timeout (30s)" in found[2]
    safe = guard(App(connector=PsycopgConnector(conninfo=ADMIN)))

    @safe.task(name="plain")
    def plain() -> None: ...

    assert no_loss_problems(safe) == []
    # A running worker's own settings (its command line's) count, not the app's defaults.
    running = {"shutdown_graceful_timeout": 5.0, "update_heartbeat_interval": 10.0}
    (timeout,) = no_loss_problems(safe, {**running, "stalled_worker_timeout": 30.0})
    assert "shutdown_graceful_timeout is set" in timeout
