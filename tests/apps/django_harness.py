"""Harness for memwarden's Django Tasks tests: a PostgreSQL database of the test's own
(created, migrated, dropped), the worker's environment and argv, the rows and the counts
the test tasks keep."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from apps.harness import journal as journal  # the tests' import
from apps.harness import worker_env

SITE = Path(__file__).resolve().parent / "django_site"
SRC = SITE.parent.parent.parent / "src"
SERVER = "host=127.0.0.1 port=5432 user=postgres"
TABLE = "django_tasks_database_dbtaskresult"


@contextmanager
def django_env(tmp_path: Path, **settings: str) -> Iterator[dict[str, str]]:
    """A fresh database, migrated, with the counts table; the worker's environment (no
    MEMWARDEN_* but ``settings``, the journal and the state dir). The database is dropped
    afterwards."""
    name = f"mw_django_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    env = worker_env(
        tmp_path,
        [SITE],
        DJANGO_SETTINGS_MODULE="django_site_settings",
        DJANGO_TEST_DB=name,
        **settings,
    )
    try:
        subprocess.run(
            [sys.executable, str(SITE / "manage.py"), "migrate", "-v0"], env=env, check=True
        )
        with connect(env) as conn:
            conn.execute(
                "CREATE TABLE mw_counts (n int, what text, count int, PRIMARY KEY (n, what))"
            )
        yield env
    finally:
        with psycopg.connect(SERVER, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def connect(env: dict[str, str]) -> psycopg.Connection[Any]:
    return psycopg.connect(f"{SERVER} dbname={env['DJANGO_TEST_DB']}", autocommit=True)


def worker_argv() -> list[str]:
    return [
        sys.executable,
        str(SITE / "manage.py"),
        "db_worker",
        "--no-reload",
        "--no-startup-delay",
        "--interval",
        "0.2",
    ]


def enqueue(env: dict[str, str], task: str, *args: Any) -> str:
    """Enqueue ``django_jobs.tasks.<task>(*args)`` as Django's backend does; its id."""
    code = (
        "import django, json, sys; django.setup(); from django_jobs import tasks; "
        f"print(getattr(tasks, {task!r}).enqueue(*json.loads(sys.argv[1])).id)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=SITE,
    )
    return out.stdout.strip().splitlines()[-1]


def counts(env: dict[str, str], what: str) -> dict[int, int]:
    with connect(env) as conn:
        rows = conn.execute("SELECT n, count FROM mw_counts WHERE what = %s", [what]).fetchall()
    return {int(n): int(c) for n, c in rows}


def row(env: dict[str, str], task_id: str) -> dict[str, Any]:
    with connect(env) as conn:
        cur = conn.execute(
            f"SELECT status, worker_ids, exception_class_path, started_at FROM {TABLE} "
            "WHERE id = %s",
            [task_id],
        )
        status, worker_ids, error, started_at = cur.fetchone() or (None, [], "", None)
    return {"status": status, "worker_ids": worker_ids, "error": error, "started_at": started_at}
