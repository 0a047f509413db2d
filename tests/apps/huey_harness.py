"""Harness for memwarden's Huey tests in memory cgroups: the environment, a producer of the
test app, the journal and the counts the tasks keep in Redis."""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from apps.harness import delete_keys, redis_counts, worker_env
from apps.harness import journal as journal  # the tests' import

APPS = Path(__file__).resolve().parent
URL = "redis://127.0.0.1:6379/5"  # Huey's Redis DB in this project's tests
CONSUMER = str(Path(sys.executable).with_name("huey_consumer"))


@contextmanager
def huey_env(tmp_path: Path, **settings: str) -> Iterator[dict[str, str]]:
    """A consumer's environment (no MEMWARDEN_* but ``settings``, the journal and the state
    dir) on a fresh queue name; every key of that name is deleted afterwards."""
    name = f"mw-huey-{uuid.uuid4().hex[:10]}"
    try:
        yield worker_env(tmp_path, [APPS], HUEY_TEST_NAME=name, HUEY_TEST_REDIS=URL, **settings)
    finally:
        delete_keys(URL, f"*{name}*", f"huey.*{name.replace('-', '')}*")  # huey drops dashes


def producer(env: dict[str, str]) -> ModuleType:
    """The test app as a producer (enqueueing only) in this process, on the env's queue."""
    spec = importlib.util.spec_from_file_location("huey_app", APPS / "huey_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("HUEY_TEST_NAME")
    os.environ["HUEY_TEST_NAME"] = env["HUEY_TEST_NAME"]
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            os.environ.pop("HUEY_TEST_NAME")
        else:
            os.environ["HUEY_TEST_NAME"] = saved
    return module


def consumer_argv(worker_type: str, workers: int) -> list[str]:
    return [CONSUMER, "huey_app.huey", "-k", worker_type, "-w", str(workers), "-c", "0.5"]


def counts(env: dict[str, str], what: str) -> dict[int, float]:
    """The hash ``{name}:{what}`` the tasks keep (done, attempts, started, …), by task."""
    return redis_counts(URL, f"{env['HUEY_TEST_NAME']}:{what}")
