"""A consumer of two process workers, forked for real, for Huey's ``LargestWorkerGauge``.

``python largest_worker.py zombie|reaped``: this process (the consumer) forks a hog (a
worker running a watchdog thread, 200 MiB held) and an idle worker. The idle worker reads
its ``LargestWorkerGauge`` once, and the hog is SIGKILLed by its own warden right after the
shared figure was read — the moment a busy machine can put between the two. The hog is
then left a zombie (its consumer has not reaped it yet) or reaped (gone). The idle worker
prints its reading as JSON: ``source``, ``total``, ``mine`` (its own RSS) and ``whole``
(the consumer's figure as read).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from memwarden.gauges import Sample, TreeGauge
from memwarden.gauges.proc import stat_fields
from memwarden.integrations.huey import LargestWorkerGauge
from memwarden.wardens import name_this_thread, runs_warden

HOG_MB = 200


def hog(ready: int) -> None:
    import threading

    held = bytearray(HOG_MB * 2**20)
    for i in range(0, len(held), 4096):
        held[i] = 1

    def watchdog() -> None:
        name_this_thread()
        os.write(ready, b"x")
        time.sleep(600)

    threading.Thread(target=watchdog, daemon=True).start()
    time.sleep(600)


def state(pid: int) -> bytes | None:
    fields = stat_fields(pid)
    return fields[0] if fields is not None else None


class KilledAfterReading:
    """The consumer's tree, read; then the hog's own kill lands before the gauge looks at
    the siblings."""

    def __init__(self, consumer: int, hog: int, how: str) -> None:
        self.tree = TreeGauge(consumer)
        self.source = self.tree.source
        self.hog, self.how = hog, how

    def read(self) -> Sample:
        sample = self.tree.read()
        os.kill(self.hog, signal.SIGKILL)
        deadline = time.monotonic() + 30
        want = (b"Z",) if self.how == "zombie" else (None,)
        while state(self.hog) not in want and time.monotonic() < deadline:
            time.sleep(0.001)
        return sample


def main(how: str) -> int:
    consumer = os.getpid()
    r, w = os.pipe()
    hog_pid = os.fork()
    if hog_pid == 0:
        hog(w)
        os._exit(0)
    os.read(r, 1)  # its watchdog runs: it is the larger sibling, and would take a kill
    assert runs_warden(hog_pid)
    out_r, out_w = os.pipe()
    idle = os.fork()
    if idle == 0:
        gauge = LargestWorkerGauge(KilledAfterReading(consumer, hog_pid, how), consumer)
        sample = gauge.read()
        fields = {"source": sample.source, "total": sample.total, "mine": sample.rss}
        line = json.dumps({**fields, "whole": gauge.whole})
        os.write(out_w, line.encode())
        os._exit(0)
    if how == "reaped":
        os.waitpid(hog_pid, 0)  # the consumer reaps its killed worker at once
    os.waitpid(idle, 0)
    if how == "zombie":
        os.waitpid(hog_pid, 0)
    os.close(out_w)
    print(os.read(out_r, 4096).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
