"""A worker stand-in for ``memwarden run`` tests: grows, ignores signals, spawns, records.

Every event goes to ``--record`` as one JSON line (``start``, ``signal``, ``spawned``), so a
test can count lifetimes and signals by pid. Memory growth is real (``workload.leak``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from memwarden import workload

SLEEPER = "import time\nwhile True: time.sleep(1)"


Record = Callable[..., None]


def main() -> None:
    args = arguments()
    record = recorder(args.record)
    stopping: list[float] = []
    quiet: list[bool] = []
    handle_signals(args, record, stopping, quiet)
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    record("start", pgid=os.getpgid(0), sid=os.getsid(0), nice=nice)  # handlers are in place
    if args.exit is not None:
        sys.exit(args.exit)
    for kid in spawn(args):
        record("spawned", child=kid.pid)
    if args.runaway:
        runaway(args.grow, args.upto)
    time.sleep(args.idle_first)
    grow(args, record, stopping, quiet)


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--record", required=True)
    p.add_argument("--grow", type=float, default=0.0, help="MiB per second")
    p.add_argument("--idle-first", type=float, default=0.0, help="seconds idle before growing")
    p.add_argument("--upto", type=float, default=4096.0, help="stop growing at this many MiB")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--term-exit", type=int, default=None, help="exit status on SIGTERM")
    p.add_argument("--term-delay", type=float, default=0.0, help="wait this long before it")
    p.add_argument("--exit", type=int, default=None, help="exit at once with this status")
    p.add_argument("--grandchildren", type=int, default=0)
    p.add_argument("--escaped", type=int, default=0, help="grandchildren in their own session")
    p.add_argument(
        "--quiet-on-tstp", action="store_true", help="stop growing on SIGTSTP (a drained worker)"
    )
    p.add_argument(
        "--runaway", action="store_true", help="grow without pause, in 1 MiB pieces (big objects)"
    )
    p.add_argument("--hog", type=float, default=0.0, help="a grandchild runs away at MiB/s")
    return p.parse_args()


def recorder(path: str) -> Record:
    """Writes an event as one JSON line into ``path``."""

    def record(event: str, **fields: object) -> None:
        line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields})
        with open(path, "a") as f:
            f.write(line + "\n")

    return record


def handle_signals(
    args: argparse.Namespace, record: Record, stopping: list[float], quiet: list[bool]
) -> None:
    """Record each signal; SIGTERM stops (after ``--term-delay``) unless ignored, SIGTSTP
    stops the growth with ``--quiet-on-tstp``."""

    def on_signal(signum: int, frame: object) -> None:
        record("signal", signal=signal.Signals(signum).name)
        if signum == signal.SIGTERM and not args.ignore_term:
            stopping.append(time.monotonic() + args.term_delay)
        if signum == signal.SIGTSTP and args.quiet_on_tstp:
            quiet.append(True)

    handled = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]
    for signum in handled + ([signal.SIGTSTP] if args.quiet_on_tstp else []):
        signal.signal(signum, on_signal)


def spawn(args: argparse.Namespace) -> list[subprocess.Popen[bytes]]:
    """The grandchildren: sleepers (the first ``--escaped`` in their own session) and a hog."""
    kids = [
        subprocess.Popen([sys.executable, "-c", SLEEPER], start_new_session=i < args.escaped)
        for i in range(args.grandchildren)
    ]
    if args.hog:
        hog = [sys.executable, __file__, "--record", os.devnull, "--runaway", "--grow"]
        kids.append(subprocess.Popen([*hog, str(args.hog)]))
    return kids


def grow(
    args: argparse.Namespace, record: Record, stopping: list[float], quiet: list[bool]
) -> None:
    """Grow at ``--grow`` MiB/s up to ``--upto`` until asked to stop, then exit."""
    grown, t0 = 0.0, time.monotonic()
    while True:
        if stopping and time.monotonic() >= stopping[0]:
            record("exit", status=args.term_exit or 0)
            os._exit(args.term_exit or 0)
        if args.grow and grown < args.upto and not quiet:
            # Steady steps: a child that was descheduled does not catch up in one jump.
            want = min(args.upto, args.grow * (time.monotonic() - t0), grown + args.grow * 0.05)
            if want - grown >= 1:
                workload.leak(want - grown)
                grown = want
        time.sleep(0.02)


def runaway(rate: float, upto: float) -> None:
    """``rate`` MiB/s in 1 MiB objects (each its own mmap), no sleep while behind."""
    t0, grown = time.monotonic(), 0
    while grown < upto:
        if grown < rate * (time.monotonic() - t0):
            workload.leak(1, chunk=workload.MB)
            grown += 1
        else:
            time.sleep(0.001)


if __name__ == "__main__":
    main()
