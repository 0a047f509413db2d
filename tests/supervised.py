"""A worker command restarted whenever it exits, as a dyno manager or kubelet would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from tests.conftest import wait_for


class Supervised:
    """Run ``argv`` in its own session from ``cwd``, again each time it exits; the whole
    session is SIGKILLed after each exit and at the end (no orphans)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.argv, self.env, self.log, self.cwd = argv, env, log, cwd
        self.starts: list[int] = []
        self.exits: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Supervised:
        self._thread.start()
        wait_for(lambda: self.starts, 30, what="the worker to start")
        return self

    def _run(self) -> None:
        with open(self.log, "ab") as out:
            while not self._stop.is_set():
                self.proc = subprocess.Popen(
                    self.argv,
                    cwd=self.cwd,
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                self.starts.append(self.proc.pid)
                self.exits.append(self.proc.wait())
                self._kill_session(self.proc.pid)

    @staticmethod
    def _kill_session(pgid: int) -> None:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self.proc is not None:
            self._kill_session(self.proc.pid)
        self._thread.join(30)
        if self.proc is not None:
            self._kill_session(self.proc.pid)
