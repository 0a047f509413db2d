"""Issue 15, item 12: ``memwarden status`` skips and counts malformed heartbeats, never dies
on one, and never blames Redis for bad data. A real Redis, the real command."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from faultkit import clean_env

from conftest import need_service

URL = "redis://127.0.0.1:6379/7"
MEMWARDEN = [sys.executable, "-c", "from memwarden.cli import main; main()"]


@pytest.fixture
def fleet() -> Iterator[tuple[str, redis.Redis]]:
    need_service("Redis", 6379)
    client = redis.Redis.from_url(URL)
    name = f"faults-{uuid.uuid4().hex[:10]}"
    yield name, client
    for key in client.scan_iter(match=f"memwarden:{name}:*"):
        client.delete(key)
    client.close()


def beat(client: redis.Redis, fleet: str, host: str, pid: int, value: object) -> None:
    data = value if isinstance(value, (bytes, str)) else json.dumps(value)
    client.set(f"memwarden:{fleet}:warden:{host}:{pid}", data, px=60_000)


GOOD = {
    "host": "good",
    "pid": 1,
    "framework": "celery",
    "memory": 100 << 20,
    "soft_limit": 400 << 20,
    "hard_limit": 500 << 20,
    "state": "ok",
    "restarts_1h": 0,
    "uptime_s": 12.5,
}


@pytest.mark.parametrize(
    "bad",
    [
        {"uptime_s": "a while"},
        {"ts": "yesterday"},
        {"memory": "lots"},
        {"pid": [1, 2]},
        {"soft_limit": {"x": 1}},
        "not json at all",
        "[1, 2, 3]",
        b"\xff\xfe binary",
    ],
    ids=["uptime", "ts", "memory", "pid", "soft", "garbage", "list", "binary"],
)
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_a_malformed_heartbeat_is_skipped_and_counted(fleet, bad, as_json: bool) -> None:
    name, client = fleet
    beat(client, name, "good", 1, {**GOOD, "fleet": name, "ts": time.time()})
    broken = (
        {**GOOD, "host": "bad", "pid": 2, "fleet": name, **bad} if isinstance(bad, dict) else bad
    )
    beat(client, name, "bad", 2, broken)
    out = subprocess.run(
        [*MEMWARDEN, "status", "--redis", URL, "--fleet", name, *(["--json"] if as_json else [])],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "cannot read Redis" not in out.stderr
    if as_json:
        report = json.loads(out.stdout)
        assert [w["host"] for w in report["wardens"]] == ["good"]
        assert report["malformed"] == 1
    else:
        assert "good" in out.stdout
        assert "1 malformed heartbeat skipped" in out.stdout
