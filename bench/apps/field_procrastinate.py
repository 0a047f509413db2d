"""The Procrastinate app of ``bench/field.py``: one coroutine task, ``field_job``, guarded by
memwarden; and what the bench does for a Procrastinate cell (its PostgreSQL database,
created with Procrastinate's schema and dropped; jobs deferred; the rows read back).

``procrastinate --app=field_procrastinate.app worker``: 4 jobs at once on the cell's queue,
Procrastinate's defaults otherwise (heartbeat 10 s, stalled after 30 s, no graceful
timeout: a drain waits for the jobs in hand). memwarden's settings come from
``MEMWARDEN_*``.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import field_jobs
import psycopg
from procrastinate import App, PsycopgConnector

import memwarden.procrastinate
from memwarden.integrations.procrastinate import KILLS_TABLE

SERVER = "postgresql://postgres@127.0.0.1:5432"

app = App(
    connector=PsycopgConnector(conninfo=os.environ.get("FIELD_PG_DSN", f"{SERVER}/postgres")),
    worker_defaults={
        "concurrency": int(os.environ.get("FIELD_CONCURRENCY", "4")),
        "queues": [os.environ.get("FIELD_QUEUE", "mw-field")],
    },
)


@app.task(name="field_job")
async def field_job(job_id: str, kind: str, mb: float = 0, secs: float = 0) -> str:
    attempt = field_jobs.started(job_id)
    for wait in field_jobs.steps(kind, mb, secs, attempt, seed=random.randrange(1 << 30)):
        await asyncio.sleep(wait)
    field_jobs.finished(job_id)
    return kind


memwarden.procrastinate.guard(app)


# ------------------------------------------------------------------ the bench's side
def db_name(token: str) -> str:
    return f"mw_field_{token}"


def create(token: str, env: dict[str, str]) -> dict[str, str]:
    """The cell's database with Procrastinate's schema; the environment the worker needs."""
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db_name(token)}")
    dsn = f"{SERVER}/{db_name(token)}"
    schema = App(connector=PsycopgConnector(conninfo=dsn))
    with schema.open():
        schema.schema_manager.apply_schema()
    return {"FIELD_PG_DSN": dsn}


def drop(token: str) -> None:
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {db_name(token)} WITH (FORCE)")


def send(env: dict[str, str], jobs: list[tuple[str, str, float, float]]) -> None:
    """``field_job.defer(...)`` on the cell's queue, as a web app would."""
    sender = App(connector=PsycopgConnector(conninfo=env["FIELD_PG_DSN"]))
    with sender.open():
        task = sender.configure_task("field_job", queue=env["FIELD_QUEUE"])
        for job_id, kind, mb, secs in jobs:
            task.defer(job_id=job_id, kind=kind, mb=mb, secs=secs)


def _rows(token: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(f"{SERVER}/{db_name(token)}") as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


def bench_ids(token: str) -> dict[str, str]:
    """Each job's id (memwarden's job id) → the bench's job id (its ``job_id`` argument)."""
    rows = _rows(token, "SELECT id, args->>'job_id' FROM procrastinate_jobs")
    return {str(i): str(b) for i, b in rows}


def kill_counts(token: str) -> dict[str, int]:
    """memwarden's kill counts (its table beside Procrastinate's), by the bench's job id."""
    exists = _rows(token, f"SELECT to_regclass('{KILLS_TABLE}')")
    if not exists or exists[0][0] is None:
        return {}
    sql = (
        f"SELECT j.args->>'job_id', k.kills FROM {KILLS_TABLE} k"
        " JOIN procrastinate_jobs j ON j.id = k.job_id"
    )
    return {str(b): int(n) for b, n in _rows(token, sql)}


def translate(records: list[dict[str, Any]], ids: dict[str, str]) -> list[dict[str, Any]]:
    """Journal records with the bench's job ids in place of Procrastinate's."""
    for r in records:
        if r.get("job_id") in ids:
            r["job_id"] = ids[r["job_id"]]
        for j in r.get("in_flight") or []:
            if j.get("job_id") in ids:
                j["job_id"] = ids[j["job_id"]]
    return records
