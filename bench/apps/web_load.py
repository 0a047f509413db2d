"""A real Gunicorn in a memory cgroup under load from real HTTP clients, measured: the
harness of ``bench/gunicorn_recycling.py`` and ``tests/test_gunicorn.py``.

Each client thread opens a new connection per request (``Connection: close``); a request
fails on any error, reset or non-200 answer. A sampler reads the cgroup's working set and
the arbiter's worker pids every 50 ms: the peak, the restarts (pids new since the start)
and the moments the set of workers changed (for the p99 during recycles).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memwarden.gauges.cgroup import Cgroup
from memwarden.gauges.proc import children_of

HERE = Path(__file__).resolve().parent
#: Requests started this close (s) to a change of workers count as "during a recycle".
RECYCLE_WINDOW = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sampler:
    """The cgroup's working set and the arbiter's workers, every ``every`` seconds."""

    cgroup: Cgroup
    arbiter: int
    every: float = 0.05
    peak: int = 0
    seen: set[int] = field(default_factory=set)
    first: set[int] = field(default_factory=set)
    changes: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Sampler:
        self.first = set(children_of(self.arbiter))
        self.seen = set(self.first)
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        last = set(self.first)
        while not self._stop.wait(self.every):
            with contextlib.suppress(OSError, ValueError):
                self.peak = max(self.peak, self.cgroup.working_set())
            now = set(children_of(self.arbiter))
            if now != last:
                self.changes.append(time.monotonic())
                self.seen |= now
                last = now

    def stop(self) -> None:
        self._stop.set()

    @property
    def restarts(self) -> int:
        return len(self.seen - self.first)


@dataclass
class Load:
    """``clients`` threads: GET ``/leak`` every ``leak_every``-th request, ``/`` else."""

    port: int
    clients: int = 4
    leak_every: int = 2
    pause: float = 0.0
    done: list[tuple[float, float]] = field(default_factory=list)  # (start, latency)
    failed: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for i in range(self.clients):
            t = threading.Thread(target=self._client, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _client(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            n += 1
            path = "/leak" if n % self.leak_every == 0 else "/"
            t0 = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                conn.request("GET", path, headers={"Connection": "close"})
                resp = conn.getresponse()
                resp.read()
                conn.close()
                if resp.status != 200:
                    self.failed.append(f"{path}: HTTP {resp.status}")
                else:
                    self.done.append((t0, time.monotonic() - t0))
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, cut short
                self.failed.append(f"{path}: {exc!r}")
            if self.pause:
                time.sleep(self.pause)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)


def p99(latencies: Sequence[float]) -> float:
    if not latencies:
        return 0.0
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def summary(load: Load, sampler: Sampler, seconds: float) -> dict[str, Any]:
    """The figures of one run."""
    during = [
        lat for t0, lat in load.done if any(abs(t0 - c) <= RECYCLE_WINDOW for c in sampler.changes)
    ]
    return {
        "served": len(load.done),
        "failed": len(load.failed),
        "rps": round(len(load.done) / seconds, 1),
        "restarts": sampler.restarts,
        "peak_mb": round(sampler.peak / 2**20, 1),
        "p99_ms": round(p99([lat for _, lat in load.done]) * 1000, 1),
        "p99_recycle_ms": round(p99(during) * 1000, 1),
    }


def wait_serving(port: int, proc: subprocess.Popen[bytes], deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/")
            if conn.getresponse().status == 200:
                conn.close()
                return
        time.sleep(0.1)
    raise TimeoutError("gunicorn did not serve in time")


@contextlib.contextmanager
def gunicorn(
    join: Any,
    port: int,
    *,
    worker_class: str = "sync",
    workers: int = 3,
    guard: bool = True,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log: str | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A gunicorn arbiter in the cgroup (``join``: the cgroup's ``preexec_fn``)."""
    app = "gunicorn_app:asgi" if "Uvicorn" in worker_class else "gunicorn_app:app"
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        worker_class,
        "--chdir",
        str(HERE),
        "--graceful-timeout",
        "30",
        "--backlog",
        "2048",
        *(["-c", str(HERE / "gunicorn_conf.py")] if guard else []),
        *extra,
        app,
    ]
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, preexec_fn=join, env={**os.environ, **(env or {})}, stdout=out, stderr=out
    )
    try:
        wait_serving(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]
