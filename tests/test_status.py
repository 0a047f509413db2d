"""``memwarden status``: live wardens of real processes from their heartbeats; dead ones drop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from conftest import need_service, wait_for
from fleet_worker import Workers
from memwarden.cli.status import fleet_table, status
from memwarden.fleet import FleetLock, Link, connect

URL = "redis://127.0.0.1:6379/7"
MEMWARDEN = str(Path(sys.executable).parent / "memwarden")


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    need_service("Redis", 6379)
    c = redis.Redis.from_url(URL)
    yield c
    c.close()


@pytest.fixture
def workers(tmp_path, client) -> Iterator[Workers]:
    fleet = f"test-{uuid.uuid4().hex[:10]}"
    w = Workers(tmp_path, URL, fleet, f"{fleet}:run")
    try:
        yield w
    finally:
        w.close()
        for pattern in (f"memwarden:{fleet}:*", f"{fleet}:*"):
            for key in client.scan_iter(match=pattern):
                client.delete(key)


def fleet_status(fleet: str) -> dict[str, Any]:
    result = CliRunner().invoke(status, ["--redis", URL, "--fleet", fleet, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def pids(fleet: str) -> set[int]:
    return {w["pid"] for w in fleet_status(fleet)["wardens"]}


@pytest.mark.slow
def test_status_shows_live_wardens_and_drops_dead_ones(workers, client):
    fleet = workers.fleet
    procs = workers.start("serve", 3, MEMWARDEN_HEARTBEAT_INTERVAL="1", HOSTNAME="box-1")
    live = {p.pid for p in procs}
    wait_for(lambda: client.llen(f"{workers.tag}:ready") == 3, 90, what="workers ready")

    def all_beating_after_their_job() -> bool:
        wardens = fleet_status(fleet)["wardens"]
        return {w["pid"] for w in wardens} == live and all(w["jobs"] == 1 for w in wardens)

    wait_for(all_beating_after_their_job, 60, what=f"3 heartbeats\n{workers.logs()}")
    for w in fleet_status(fleet)["wardens"]:
        assert w["fleet"] == fleet and w["host"] == "box-1" and w["framework"] == "test"
        assert w["state"] == "ok" and w["restarts_1h"] == 0 and w["oom_kills"] == 0
        assert w["last_culprit"] == "grow"
        assert w["memory"] > 0 and w["soft_limit"] > w["memory"] and w["gauge"] == "process"

    # A worker killed outright stops beating: it drops out when its heartbeat expires.
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=30)
    wait_for(lambda: pids(fleet) == live - {procs[0].pid}, 60, what="the dead warden gone")
    # A worker stopped cleanly removes its heartbeat itself.
    procs[1].send_signal(signal.SIGTERM)
    assert procs[1].wait(timeout=30) == 0
    assert pids(fleet) == {procs[2].pid}

    # The table, from the real command, with a restart under way in the fleet.
    holder = FleetLock(Link(connect(URL), URL), fleet, k=1, ttl=30)
    assert holder.try_acquire()
    try:
        out = subprocess.run(
            [MEMWARDEN, "status", "--fleet", fleet],
            env={**os.environ, "MEMWARDEN_REDIS_URL": URL},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    finally:
        holder.release()
    header, row = out.splitlines()[:2]
    assert header.split()[:3] == ["FLEET", "WORKER", "PID"] and "LAST CULPRIT" in header
    assert "OOM KILLS" in header
    assert row.split()[:4] == [fleet, "box-1", str(procs[2].pid), "test"]
    assert f"restarting in {fleet}: {socket.gethostname()}:{os.getpid()}:" in out


def test_render_of_an_empty_fleet_says_so():
    text = fleet_table({"wardens": [], "restarting": {}})
    assert "no live warden" in text


def test_status_needs_a_redis_and_hides_its_password():
    runner = CliRunner()
    result = runner.invoke(status, [], env={"MEMWARDEN_REDIS_URL": ""})
    assert result.exit_code == 2 and "MEMWARDEN_REDIS_URL" in result.output
    result = runner.invoke(status, ["--redis", "redis://:hunter2-pw@127.0.0.1:1/7"])
    assert result.exit_code == 1
    assert "cannot read Redis redis://:***@127.0.0.1:1/7" in result.output
    assert "hunter2-pw" not in result.output
