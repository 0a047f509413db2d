"""The plain Python worker of ``bench/field.py``'s ``run`` cells, guarded from outside by
``memwarden run``: no memwarden inside, a SIGTERM handler, a reliable Redis queue.

``FIELD_CONCURRENCY`` threads each move one job at a time from ``{FIELD_QUEUE}`` to
``{FIELD_QUEUE}:processing`` (``BLMOVE``), run it (:func:`field_jobs.run`) and remove it from
the processing list. At start, whatever a killed predecessor left in the processing list
goes back to the queue first: every job runs at least once. SIGTERM (or SIGINT): take no
new job, finish the ones in hand, exit 0. Each job is told to ``run`` (:mod:`memwarden.command`):
one that ``run`` quarantined is skipped and parked in ``{FIELD_QUEUE}:dead``.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import field_jobs

from memwarden import command

QUEUE = os.environ.get("FIELD_QUEUE", "mw-field")
PROCESSING = f"{QUEUE}:processing"
STOP = threading.Event()


def worker() -> None:
    r = field_jobs.store()
    while not STOP.is_set():
        raw = r.blmove(QUEUE, PROCESSING, 1, "RIGHT", "LEFT")
        if raw is None:
            continue
        job = json.loads(raw)
        if command.quarantined(job["id"]):
            command.skipped(job["id"], job["kind"])
            r.rpush(f"{QUEUE}:dead", raw)
        else:
            with command.job(job["id"], job["kind"]):
                field_jobs.run(job["id"], job["kind"], job["mb"], job["secs"])
        r.lrem(PROCESSING, 1, raw)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    signal.signal(signal.SIGINT, lambda *_: STOP.set())
    r = field_jobs.store()
    while r.lmove(PROCESSING, QUEUE, "LEFT", "RIGHT") is not None:
        pass  # a killed predecessor's jobs in hand: back to the head of the queue
    threads = [
        threading.Thread(target=worker, name=f"field-{i}")
        for i in range(int(os.environ.get("FIELD_CONCURRENCY", "2")))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
