"""Two sibling worker processes under one cgroup figure, forked for real, for
``Warden._a_sibling_holds_it`` (Dramatiq's processes, Huey's in a cgroup).

``python sibling_killed.py LIMIT``, run inside a memory cgroup: this process forks a hog (a
watchdog thread, 200 MiB held) and an idle worker whose warden (hard limit ``LIMIT``, no job
in hand) reads the cgroup over the limit — with the hog's memory in it — and the hog's own
warden kills it right after that reading: it is gone (reaped) before the idle warden looks
for a larger sibling. Prints ``{"idle": <exit status>, "decided": <the idle warden's
decision>, "records": [...]}``; a kill of the idle worker shows as -9 and a ``kill`` record.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

from memwarden.gauges import CgroupGauge, Sample
from memwarden.gauges.cgroup import Cgroup
from memwarden.gauges.proc import stat_fields
from memwarden.wardens import name_this_thread

HOG_MB = 200


def hog(go: int, ready: int) -> None:
    os.read(go, 1)
    held = bytearray(HOG_MB * 2**20)
    for i in range(0, len(held), 4096):
        held[i] = 1

    def watchdog() -> None:
        name_this_thread()
        os.write(ready, b"x")
        time.sleep(600)

    threading.Thread(target=watchdog, daemon=True).start()
    time.sleep(600)


class KilledAfterReading:
    """The cgroup, read; once armed, the hog's own kill lands (and its consumer reaps it)
    before the warden looks at its siblings."""

    source = "cgroup"

    def __init__(self, cgroup: Cgroup, hog: int) -> None:
        self.cgroup = CgroupGauge(cgroup)
        self.hog = hog
        self.armed = False

    def read(self) -> Sample:
        sample = self.cgroup.read()
        if self.armed:
            self.armed = False
            os.kill(self.hog, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while stat_fields(self.hog) is not None and time.monotonic() < deadline:
                time.sleep(0.001)
        return sample


def idle(limit: str, hog_pid: int, go: int, ready: int, journal: str) -> None:
    from memwarden.warden import Warden

    cgroup = Cgroup.of_self()
    assert cgroup is not None
    gauge = KilledAfterReading(cgroup, hog_pid)
    warden = Warden(
        gauge=gauge,
        journal=journal,
        soft_limit=limit,
        hard_limit=limit,
        grace=0,
        min_uptime=0,
        reclaim=False,
        state_dir=os.path.dirname(journal),
    )
    os.write(go, b"x")
    os.read(ready, 1)  # the hog holds its memory and runs its watchdog
    gauge.armed = True
    decision = warden.check()
    warden.journal.close()
    with open(os.path.join(os.path.dirname(journal), "decided"), "w") as f:
        f.write(decision.action.name if decision is not None else "")


def main(limit: str) -> int:
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    hog_pid = os.fork()
    if hog_pid == 0:
        hog(go_r, ready_w)
        os._exit(0)
    journal = os.path.join(tempfile.mkdtemp(prefix="mw-sibling-"), "journal.jsonl")
    idle_pid = os.fork()
    if idle_pid == 0:
        try:
            idle(limit, hog_pid, go_w, ready_r, journal)
        finally:
            os._exit(0)
    os.waitpid(hog_pid, 0)  # the consumer reaps its killed worker at once
    _, status = os.waitpid(idle_pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    records, decided = [], None
    if os.path.exists(journal):
        with open(journal) as f:
            records = [json.loads(line) for line in f if line.strip()]
    with contextlib.suppress(OSError), open(os.path.join(os.path.dirname(journal), "decided")) as f:
        decided = f.read()
    shutil.rmtree(os.path.dirname(journal), ignore_errors=True)
    print(json.dumps({"idle": code, "decided": decided, "records": records}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
