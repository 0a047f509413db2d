"""Issue 15, items 4 and 5: any failure of a restart action falls back to the exit, once and
loudly; a platform API call has one deadline in wall time, however slowly the server talks."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import TESTS

from fakeapi import Fallback
from memwarden.restart.api import Secret
from memwarden.restart.heroku import HerokuRestarter
from memwarden.restart.kubernetes import PodDeleter
from platform_worker import run_worker

HEROKU = {"DYNO": "worker.1", "HEROKU_APP_NAME": "memwarden-test", "MEMWARDEN_RESTART": "heroku"}


def test_a_worker_whose_token_cannot_be_sent_exits_instead_of_staying_drained(tmp_path: Path):
    proc, records = run_worker(
        tmp_path,
        {
            "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), TESTS) if p),
            **HEROKU,
            "HEROKU_API_TOKEN": "hrku-tökén",
            "MEMWARDEN_HEROKU_API_URL": "http://127.0.0.1:1",
            "MEMWARDEN_EXIT_CODE": "75",
        },
    )
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert [r["event"] for r in records if r["event"] in ("restart", "drain")] == [
        "restart",
        "drain",
    ]
    assert "restarting the local way instead" in proc.stderr
    assert "HEROKU_API_TOKEN" in proc.stderr
    assert "tökén" not in proc.stderr


@pytest.mark.parametrize("api_url", ["http://[::1", "http://127.0.0.1:1/\x00"])
def test_any_exception_of_the_heroku_call_falls_back_once(api_url: str, caplog):
    fallback = Fallback()
    restarter = HerokuRestarter(
        app="a", dyno="worker.1", token=Secret("t0k3n-abcdefgh"), api_url=api_url, fallback=fallback
    )
    with caplog.at_level(logging.ERROR, logger="memwarden"):
        restarter.restart("over")
        restarter.restart("over again")
    assert len(fallback.calls) == 1
    assert "Heroku restart failed" in caplog.text or "cannot be sent" in caplog.text
    assert "t0k3n-abcdefgh" not in caplog.text


def test_any_exception_of_the_pod_deletion_falls_back_once(tmp_path: Path, caplog):
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("tök€n-abcdefgh")
    fallback = Fallback()
    deleter = PodDeleter(
        api_url="http://127.0.0.1:1",
        sa_dir=str(sa),
        namespace="ns",
        pod="pod-1",
        grace=30,
        fallback=fallback,
    )
    with caplog.at_level(logging.ERROR, logger="memwarden"):
        deleter.restart("over")
    assert fallback.calls == ["pod deletion failed"]
    assert "tök€n" not in caplog.text


@pytest.fixture
def trickler() -> Iterator[str]:
    """An HTTP server that sends a byte every 1.5 s (for up to 20 s per connection)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            reply = b"HTTP/1.1 503 Slow\r\nX-Padding: " + b"z" * 64
            end = time.monotonic() + 20
            for byte in reply:
                if stop.wait(1.5) or time.monotonic() > end:
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.close()


def test_a_trickling_server_cannot_hold_a_restart_past_its_deadline(trickler: str, caplog):
    fallback = Fallback()
    from memwarden.config import Config

    config = Config(
        restart="heroku",
        heroku_api_url=trickler,
        api_timeout=2,
        api_retries=3,
        shutdown_timeout=6,
    )
    env = {**HEROKU, "HEROKU_API_TOKEN": "t0k3n-abcdefgh"}
    restarter = HerokuRestarter.from_env(config, env, fallback)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="memwarden"):
        restarter.restart("over")
    took = time.monotonic() - started
    assert fallback.calls == ["heroku API unavailable"]
    # One deadline for the whole call (6 s here); before, each read had its own timeout
    # and a server trickling a byte every 1.5 s held the call for minutes.
    assert took < 6.0 + 2.0, f"the call took {took:.1f}s"
    assert "gave up" in caplog.text


def test_the_deadline_of_a_platform_restart_is_the_shutdown_timeout():
    from memwarden.config import Config

    config = Config(restart="heroku", shutdown_timeout=12, api_timeout=2)
    restarter = HerokuRestarter.from_env(config, HEROKU, Fallback())
    assert restarter.deadline == 12.0
