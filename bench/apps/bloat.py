"""A bloating worker for ``bench/supervisors.py``: jobs that leak, and a helper child.

Starts one helper child (holds ``--helper-mb`` MiB and sleeps: think of a sidecar a worker
spawns), then runs jobs of ``--job-s`` seconds, each leaking ``--rate`` MiB/s in small steps,
forever. SIGTERM/SIGINT: finish the current job, then exit 0 — without telling the helper,
as many real programs do; whoever stops us must stop our process group to leave no orphan.

Every event is one line appended to ``BENCH_EVENTS``: ``start <pid>``, ``begin <pid> <n>``,
``done <pid> <n>``, so the bench counts starts, jobs done and jobs interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from memwarden import workload

STOPPING = False


def note(text: str) -> None:
    path = os.environ.get("BENCH_EVENTS")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (text + "\n").encode())
        finally:
            os.close(fd)


def helper(mb: int) -> None:
    workload.leak(mb)
    while True:
        time.sleep(3600)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=float, default=8.0, help="MiB leaked per second of work")
    p.add_argument("--job-s", type=float, default=0.2)
    p.add_argument("--helper-mb", type=int, default=16)
    p.add_argument("--helper", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.helper:
        helper(a.helper_mb)
        return

    def stop(*_: object) -> None:
        global STOPPING
        STOPPING = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    subprocess.Popen([sys.executable, __file__, "--helper", "--helper-mb", str(a.helper_mb)])
    pid = os.getpid()
    note(f"start {pid}")
    steps = 10
    n = 0
    while not STOPPING:
        n += 1
        note(f"begin {pid} {n}")
        for _ in range(steps):
            workload.leak(a.rate * a.job_s / steps)
            time.sleep(a.job_s / steps)
        note(f"done {pid} {n}")


if __name__ == "__main__":
    main()
