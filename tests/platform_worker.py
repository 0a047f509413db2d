"""A real worker process for the platform restart tests (Heroku, Kubernetes, systemd).

Run as ``python platform_worker.py JOURNAL``; settings come from ``MEMWARDEN_*`` and the
platform's own variables. It starts a long job, lets its warden see a first reading under
the soft limit, then really allocates past it. The warden decides a restart and drains;
the job finishes 0.3 s after the drain began; then the restarter runs. A SIGTERM (what
Heroku or the kubelet sends after the API call) ends it with status 0; the exit-based
restarts end it with their own status. Everything is logged at DEBUG to stderr (httpx's
own loggers included) and the reprs are printed, so tests can search all of it for secrets.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from memwarden import workload
from memwarden.gauges.proc import self_rss
from memwarden.journal import Journal, read_records
from memwarden.warden import Hooks, Warden

MB = 1024 * 1024


def main(journal: str) -> int:
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s %(message)s")
    drained = threading.Event()
    warden: Warden | None = None

    def drain() -> None:
        assert warden is not None
        warden.journal.write("drain")
        drained.set()

    def on_term(signum: int, frame: object) -> None:
        assert warden is not None
        warden.journal.write("sigterm")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    with open(journal + ".pid", "w") as f:  # for the stand-in platform's SIGTERM
        f.write(str(os.getpid()))
    rss = self_rss()
    warden = Warden.from_env(
        hooks=Hooks(drain=drain),
        framework="test",
        measure="process",
        journal=Journal(journal),
        soft_limit=f"{rss + 48 * MB}B",
        hard_limit=f"{rss + 4096 * MB}B",
        reclaim=False,
        grace=0,
        min_uptime=0,
        interval=0.05,
    )
    print(repr(warden), repr(warden.restarter), repr(warden.config), flush=True)
    warden.job_started("long_job", "job-1")
    warden.start()
    deadline = time.monotonic() + 60
    while warden.last_sample is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workload.leak(96)
    if not drained.wait(60):
        return 3
    time.sleep(0.3)  # the job in flight finishes its work
    warden.job_finished("job-1")
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return 4  # nobody ended us: the restart did not happen


def run_worker(
    tmp_path: Path, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """Run this worker with ``env``; returns the finished process and its journal records."""
    journal = tmp_path / "journal.jsonl"
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MEMWARDEN_", "HEROKU_"))},
        "PYTHONPATH": os.path.dirname(os.path.abspath(__file__)),
        "MEMWARDEN_STATE_DIR": str(tmp_path / "state"),
        "MEMWARDEN_SHUTDOWN_TIMEOUT": "30",
        **env,
    }
    proc = subprocess.run(
        [sys.executable, __file__, str(journal)],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )
    records, _ = read_records(journal.read_text().splitlines() if journal.exists() else [])
    return proc, records


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
