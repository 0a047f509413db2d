"""Harness for memwarden's RQ tests: a worker restart loop, the environment, the journal."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import psutil
import redis

from memwarden.journal import read_records

REDIS_URL = "redis://127.0.0.1:6379/3"  # the RQ tests' own Redis database
TESTS = Path(__file__).resolve().parent.parent


class WorkerLoop:
    """Keep one ``rq worker`` running: start it again whenever it exits (what ``rq
    worker-pool``, ``memwarden run`` or the dyno manager do)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, cgroup: Any) -> None:
        self.argv, self.env, self.log, self.cgroup = argv, env, log, cgroup
        self.exits: list[int] = []
        self.current: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._spawning = threading.Lock()  # no start after the stop
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        with open(self.log, "ab") as out:
            while True:
                with self._spawning:
                    if self._stop.is_set():
                        return
                    self.current = subprocess.Popen(
                        self.argv,
                        env=self.env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        preexec_fn=self.cgroup.join,
                    )
                status = self.current.wait()
                if not self._stop.is_set():  # not our own kill at the end
                    self.exits.append(status)

    def __exit__(self, *exc: object) -> None:
        with self._spawning:
            self._stop.set()
        proc = self.current
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # RQ's warm shutdown: it leaves Redis tidy
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                tree = psutil.Process(proc.pid).children(recursive=True)
                for p in tree:
                    p.kill()
            proc.kill()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()


def start_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """A worker's environment: our test jobs importable, quick settings, a private state."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMWARDEN_", "RQ_"))}
    env.update(
        PYTHONPATH=str(TESTS),
        MWT_REDIS_URL=REDIS_URL,
        MEMWARDEN_MEASURE="tree",
        MEMWARDEN_JOURNAL=str(tmp_path / "journal.jsonl"),
        MEMWARDEN_STATE_DIR=str(tmp_path / "state"),
        MEMWARDEN_INTERVAL="0.1",
        MEMWARDEN_GRACE="1",
        MEMWARDEN_MIN_UPTIME="0",
        MEMWARDEN_MAX_RESTARTS="100",
        MEMWARDEN_SHUTDOWN_TIMEOUT="20",
    )
    env.update(settings)
    return env


def journal(tmp_path: Path) -> list[dict]:
    path = tmp_path / "journal.jsonl"
    if not path.exists():
        return []
    with open(path) as f:
        return read_records(f)[0]


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def forget(conn: redis.Redis, name: str, ids: list[str]) -> int:
    """Delete what a test left in Redis: keys naming its queue or one of its job ids."""
    jobs = set(ids)
    doomed = []
    for key in conn.scan_iter(count=1000):
        text = key.decode()
        if name in text or any(m in jobs for m in _UUID.findall(text)):
            doomed.append(key)
    for at in range(0, len(doomed), 500):
        conn.delete(*doomed[at : at + 500])
    conn.srem("rq:queues", f"rq:queue:{name}")
    return len(doomed)
