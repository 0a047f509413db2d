"""systemd: sd_notify over a real AF_UNIX datagram socket, then the configured exit code."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from memwarden.config import Config
from memwarden.restart import make_restarter
from memwarden.restart.systemd import SystemdRestarter, notify
from platform_worker import run_worker


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket, as systemd's ``NOTIFY_SOCKET`` (short path: 108-byte limit)."""
    directory = tempfile.mkdtemp(prefix="mw-sd-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_notify_sends_one_datagram(notify_socket):
    sock, path = notify_socket
    assert notify("STOPPING=1\nSTATUS=bye", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"


def test_notify_reaches_an_abstract_socket():
    name = f"memwarden-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(60)
        assert notify("STATUS=hello", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STATUS=hello"


def test_notify_without_a_manager_is_a_quiet_no(caplog, tmp_path):
    assert notify("STOPPING=1", {}) is False
    assert notify("STOPPING=1", {"NOTIFY_SOCKET": "relative/path"}) is False
    with caplog.at_level(logging.WARNING, logger="memwarden"):
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is False
    assert any("NOTIFY_SOCKET" in m for m in caplog.messages)


def test_the_exit_code_is_configurable():
    r = make_restarter(Config(restart="systemd", exit_code=42))
    assert isinstance(r, SystemdRestarter) and r.code == 42 and r.name == "systemd"


@pytest.mark.slow
def test_a_real_worker_drains_notifies_and_exits_for_restart_on_failure(notify_socket, tmp_path):
    sock, path = notify_socket
    env = {"MEMWARDEN_RESTART": "systemd", "MEMWARDEN_EXIT_CODE": "42", "NOTIFY_SOCKET": path}
    proc, records = run_worker(tmp_path, env)
    assert proc.returncode == 42, proc.stderr[-3000:]
    message = sock.recv(4096).decode()
    lines = message.split("\n")
    assert lines[0] == "STOPPING=1"
    assert lines[1].startswith("STATUS=memwarden: restarting: ") and "over soft limit" in lines[1]
    events = [r["event"] for r in records]
    assert events.index("restart") < events.index("drain") < events.index("job")
    # The job record exists, so the exit came after the in-flight job finished.
    assert next(r for r in records if r["event"] == "job")["job_id"] == "job-1"
