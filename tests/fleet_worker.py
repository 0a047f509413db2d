"""A real worker process for the fleet tests: ``python fleet_worker.py MODE TAG``.

Settings come from ``MEMWARDEN_*`` (Redis URL, fleet, K, TTL, heartbeat interval, and a
state dir of its own: one "host" per worker, so only the fleet lock is shared). Each
worker announces itself on the Redis list ``TAG:ready``.

- ``restart``: waits for the key ``TAG:go``, then really allocates past its soft limit, so
  its warden wants a restart and asks the fleet lock (again at every check while the fleet
  is full). Its restarter records ``enter`` on ``TAG:events`` (only a lock holder gets
  there), holds for ``HOLD`` seconds (``inf``: forever, to be SIGKILLed), records ``exit``
  and ends the process — its place is then freed by the lease's TTL, as after a real exit.
- ``serve``: runs one job that grows memory, then serves until SIGTERM (clean stop).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from memwarden import workload
from memwarden.gauges.proc import self_rss
from memwarden.warden import Warden

MB = 1024 * 1024


class Recorder:
    """The restarter: proves by a record that this process held the fleet lock."""

    name = "recorder"

    def __init__(self, client: redis.Redis, tag: str, hold: float) -> None:
        self.client = client
        self.tag = tag
        self.hold = hold

    def record(self, what: str) -> None:
        event = {"pid": os.getpid(), "what": what, "t": time.time()}
        self.client.rpush(f"{self.tag}:events", json.dumps(event))

    def restart(self, reason: str) -> None:
        self.record("enter")
        if self.hold == float("inf"):
            while True:
                time.sleep(1)
        time.sleep(self.hold)
        self.record("exit")
        os._exit(0)


def main(mode: str, tag: str) -> int:
    client = redis.Redis.from_url(os.environ["MEMWARDEN_REDIS_URL"])
    rss = self_rss()
    warden = Warden.from_env(
        restarter=Recorder(client, tag, float(os.environ.get("HOLD", "1"))),
        framework="test",
        measure="process",
        soft_limit=f"{rss + 32 * MB}B",
        hard_limit=f"{rss + 4096 * MB}B",
        reclaim=False,
        grace=0,
        min_uptime=0,
        interval=0.05,
    )
    signal.signal(signal.SIGTERM, lambda *_: (warden.stop(), os._exit(0)))
    warden.start()
    deadline = time.monotonic() + 90
    while warden.last_sample is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if mode == "serve":
        with warden.job("grow", "job-1"):
            workload.leak(4)
    client.rpush(f"{tag}:ready", os.getpid())
    if mode == "restart":
        while not client.exists(f"{tag}:go") and time.monotonic() < deadline:
            time.sleep(0.01)
        workload.leak(64)
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return 4


class Workers:
    """Fleet worker processes; every one is killed and reaped at the end."""

    def __init__(self, tmp_path: Path, redis_url: str, fleet: str, tag: str) -> None:
        self.tmp_path = tmp_path
        self.redis_url = redis_url
        self.fleet = fleet
        self.tag = tag
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, mode: str, n: int, **env: str) -> list[subprocess.Popen[bytes]]:
        started = []
        for _ in range(n):
            i = len(self.procs)
            full = {
                **{k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")},
                "PYTHONPATH": os.path.dirname(os.path.abspath(__file__)),
                "MEMWARDEN_REDIS_URL": self.redis_url,
                "MEMWARDEN_FLEET": self.fleet,
                "MEMWARDEN_STATE_DIR": str(self.tmp_path / f"state-{i}"),
                **env,
            }
            log = open(self.tmp_path / f"worker-{i}.log", "wb")  # noqa: SIM115
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), mode, self.tag],
                env=full,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            self.procs.append(proc)
            started.append(proc)
        return started

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.tmp_path.glob("worker-*.log")))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.kill()
        for p in self.procs:
            p.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
