"""What ``bench/field.py`` does for a Django Tasks cell: the cell's database (created and
migrated, dropped), jobs enqueued through Django's API, and the rows read back (each row's
id to the bench's job id, memwarden's kill counts in ``worker_ids``)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import psycopg

SERVER = "host=127.0.0.1 port=5432 user=postgres"
TABLE = "django_tasks_database_dbtaskresult"
KILLED = " (killed)"
ENQUEUE = (
    "import django, json, sys; django.setup(); from field_django.tasks import field_job\n"
    "for j in json.load(sys.stdin): field_job.enqueue(*j)"
)


def db_name(token: str) -> str:
    return f"mw_field_{token}"


def create(token: str, env: dict[str, str]) -> dict[str, str]:
    """The cell's database, migrated; the environment the worker and the sender need."""
    name = db_name(token)
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    extra = {"DJANGO_SETTINGS_MODULE": "field_django.settings", "FIELD_DJANGO_DB": name}
    manage = [sys.executable, "-m", "django", "migrate", "-v0"]
    subprocess.run(manage, env={**env, **extra}, check=True)
    return extra


def drop(token: str) -> None:
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {db_name(token)} WITH (FORCE)")


def send(env: dict[str, str], jobs: list[tuple[str, str, float, float]]) -> None:
    """``field_job.enqueue(...)`` for each job, from a Django process of the project."""
    code = [sys.executable, "-c", ENQUEUE]
    subprocess.run(code, env=env, input=json.dumps(jobs), text=True, check=True)


def _rows(token: str) -> list[tuple[str, Any, list[str]]]:
    with psycopg.connect(f"{SERVER} dbname={db_name(token)}") as conn:
        rows = conn.execute(f"SELECT id, args_kwargs, worker_ids FROM {TABLE}").fetchall()
    return [(str(i), args, ids) for i, args, ids in rows]


def bench_ids(token: str) -> dict[str, str]:
    """Each row's id (memwarden's job id) → the bench's job id (the task's first argument)."""
    return {i: args["args"][0] for i, args, _ in _rows(token)}


def kill_counts(token: str) -> dict[str, int]:
    """memwarden's kill counts, by the bench's job id: ``(killed)`` marks in ``worker_ids``."""
    out = {}
    for _, args, ids in _rows(token):
        out[args["args"][0]] = sum(1 for w in ids if w.endswith(KILLED))
    return out


def translate(records: list[dict[str, Any]], ids: dict[str, str]) -> list[dict[str, Any]]:
    """Journal records with the bench's job ids in place of the rows' ids."""
    for r in records:
        if r.get("job_id") in ids:
            r["job_id"] = ids[r["job_id"]]
        for j in r.get("in_flight") or []:
            if j.get("job_id") in ids:
                j["job_id"] = ids[j["job_id"]]
    return records
