"""A worker for ``memwarden run`` tests that tells ``run`` its jobs (:mod:`memwarden.command`).

Its queue is a directory (``--queue``): each job a file ``<id>`` holding its kind. A thread
takes the first file by moving it into ``<queue>.inhand/``; what a killed predecessor left
there goes back first. ``light`` sleeps 50 ms; ``leak`` keeps 4 MiB for good; ``poison``
grows 256 MiB/s without end. A quarantined job is skipped into ``<queue>.dead/``. Each run
and completion is a line in ``--record``: ``run <id>`` / ``done <id>``.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

from memwarden import command

KEPT: list[bytearray] = []
STOP = threading.Event()
LOCK = threading.Lock()


def take(queue: str, inhand: str) -> str | None:
    with LOCK:
        for name in sorted(os.listdir(queue)):
            try:
                os.replace(os.path.join(queue, name), os.path.join(inhand, name))
            except FileNotFoundError:
                continue
            return name
    return None


def note(record: str, line: str) -> None:
    with open(record, "a") as f:
        f.write(line + "\n")


def work(kind: str) -> None:
    if kind == "leak":
        KEPT.append(bytearray(b"\x01") * (4 << 20))
    elif kind == "poison":
        for _ in range(4096):  # 8 MiB every 1/32 s: 256 MiB/s, until killed
            KEPT.append(bytearray(b"\x06") * (8 << 20))
            time.sleep(1 / 32)
    time.sleep(0.05)


def worker(queue: str, record: str) -> None:
    inhand, dead = queue + ".inhand", queue + ".dead"
    while not STOP.is_set():
        job_id = take(queue, inhand)
        if job_id is None:
            time.sleep(0.02)
            continue
        path = os.path.join(inhand, job_id)
        with open(path) as f:
            kind = f.read().strip()
        if command.quarantined(job_id):
            command.skipped(job_id, kind)
            os.replace(path, os.path.join(dead, job_id))
            continue
        note(record, f"run {job_id}")
        with command.job(job_id, kind):
            work(kind)
        note(record, f"done {job_id}")
        os.unlink(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--queue", required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    for d in (a.queue + ".inhand", a.queue + ".dead"):
        os.makedirs(d, exist_ok=True)
    for name in os.listdir(a.queue + ".inhand"):  # a killed predecessor's jobs in hand
        os.replace(os.path.join(a.queue + ".inhand", name), os.path.join(a.queue, name))
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    threads = [threading.Thread(target=worker, args=(a.queue, a.record)) for _ in range(a.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
