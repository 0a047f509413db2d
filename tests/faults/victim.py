"""A real worker process with an in-process warden, for the issue-15 fault tests.

``python victim.py JOURNAL [--break-state] [--watch SECONDS]``: settings from ``MEMWARDEN_*``
(the state dir too: default unless set). It starts its watchdog, lets it see a first reading
under the soft limit, then really allocates past it (no job in hand: a restart at once).
The restart is ``none`` (recorded only), so the process lives on to report. With
``--break-state`` the state dir is replaced by a plain file first (an unusable state dir);
with ``--hold S`` it only stays over the limit for S seconds (``--max-restarts 0``: capped).
It watches for ``--watch`` seconds after the restart, then prints one JSON line: the state
dir used, whether it restarted, and how many ERROR lines and tracebacks it logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

from memwarden import workload
from memwarden.gauges.proc import self_rss
from memwarden.journal import Journal
from memwarden.warden import Warden

MB = 1024 * 1024


class Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.errors = 0
        self.tracebacks = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.errors += record.levelno >= logging.ERROR
        self.tracebacks += record.exc_info is not None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("journal")
    p.add_argument("--break-state", action="store_true")
    p.add_argument("--watch", type=float, default=0.0)
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--hold", type=float, default=None, help="stay over the limit this long")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    counter = Counter()
    logging.getLogger("memwarden").addHandler(counter)
    rss = self_rss()
    fast: dict[str, Any] = {} if "MEMWARDEN_INTERVAL" in os.environ else {"interval": 0.05}
    warden = Warden.from_env(
        measure="process",
        quota=None,
        soft_limit=f"{rss + 24 * MB}B",
        hard_limit=f"{rss + 4096 * MB}B",
        grace=0,
        min_uptime=0,
        reclaim=False,
        restart="none",
        max_restarts=args.max_restarts,
        **fast,
        journal=Journal(args.journal),
    )
    state = warden.config.state_path
    if args.break_state:
        shutil.rmtree(state, ignore_errors=True)
        with open(state, "w") as f:
            f.write("not a directory")
    warden.start()
    deadline = time.monotonic() + 60
    while warden.last_sample is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workload.leak(64)
    restarted = False
    if args.hold is not None:
        time.sleep(args.hold)
        deadline = time.monotonic()
    while time.monotonic() < deadline:
        if any(r["event"] == "restart" for r in warden.journal.recent):
            restarted = True
            break
        time.sleep(0.05)
    time.sleep(args.watch)
    warden.close()
    if args.break_state:
        os.unlink(state)
    report = {
        "state_dir": state,
        "restarted": restarted,
        "errors": counter.errors,
        "tracebacks": counter.tracebacks,
        "pid": os.getpid(),
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
