"""What the framework harnesses share: a worker's environment, its journal, the counts the
test jobs keep in a Redis hash, and the Redis keys of a test queue deleted afterwards."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import redis

SRC = Path(__file__).resolve().parent.parent.parent / "src"


def worker_env(tmp_path: Path, path: list[Path], **settings: str) -> dict[str, str]:
    """This process's environment without MEMWARDEN_* but ``settings``, the journal and the
    state dir under ``tmp_path``, and ``path`` (after memwarden's src) as PYTHONPATH."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")},
        "PYTHONPATH": os.pathsep.join(str(p) for p in [SRC, *path]),
        "MEMWARDEN_JOURNAL": str(tmp_path / "journal.jsonl"),
        "MEMWARDEN_STATE_DIR": str(tmp_path / "state"),
        **settings,
    }


def journal(env: dict[str, str], event: str | None = None) -> list[dict[str, Any]]:
    """The records of the env's journal (of ``event`` only, if given)."""
    path = Path(env["MEMWARDEN_JOURNAL"])
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if event is None or r.get("event") == event]


def redis_counts(url: str, key: str) -> dict[int, float]:
    """The hash ``key`` the test jobs keep (done, attempts, started, …), by job number."""
    raw = redis.Redis.from_url(url).hgetall(key)
    return {int(k): float(v) for k, v in raw.items()}


def delete_keys(url: str, *patterns: str) -> None:
    """Every key matching one of ``patterns``."""
    r = redis.Redis.from_url(url)
    for pattern in patterns:
        for key in r.scan_iter(pattern):
            r.delete(key)
