"""Shared test fixtures: real services, real processes, generous deadlines."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest

from memwarden.reclaim import malloc_trim

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
#: Settings for end-to-end framework tests: the ladder acts at once (no grace, no minimum
#: uptime, restarts unbounded), the process tree read every 0.1 s, poison after 2 kills.
QUICK_LADDER = {
    "MEMWARDEN_INTERVAL": "0.1",
    "MEMWARDEN_GRACE": "0",
    "MEMWARDEN_MIN_UPTIME": "0",
    "MEMWARDEN_MAX_RESTARTS": "1000",
    "MEMWARDEN_SHUTDOWN_TIMEOUT": "20",
    "MEMWARDEN_POISON_KILLS": "2",
    "MEMWARDEN_MEASURE": "tree",
}


def service_answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def need_service(name: str, port: int) -> None:
    """Skip (with the reason) where the service is missing; in CI a missing one fails."""
    if service_answers(port):
        return
    message = f"{name} is not answering on 127.0.0.1:{port}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing service is a failure)")
    pytest.skip(f"{message}: start it to run this test")


def wait_for(
    condition: Callable[[], object], timeout: float = 60.0, interval: float = 0.05, what: str = ""
) -> object:
    """Poll ``condition`` until it is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


@pytest.fixture
def redis_url() -> str:
    need_service("Redis", 6379)
    return "redis://127.0.0.1:6379/0"


@pytest.fixture
def amqp_url() -> str:
    need_service("RabbitMQ", 5672)
    return "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture(autouse=True)
def _fresh_heap_pages() -> None:
    """Each test starts with the free pages of pytest's heap handed back to the OS. Earlier
    tests leave holes in the heap that stay resident; memory a later test allocates in this
    process (or in a child it forks, where a write only copies a shared page) would reuse
    them and not move RSS at all (a CI run: a forked child's 64 MiB grew it by 0)."""
    malloc_trim()
