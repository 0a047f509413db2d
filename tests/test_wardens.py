"""Which sibling processes will take a hard kill: ``memwarden.wardens``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import wait_for
from memwarden.gauges.proc import stat_fields
from memwarden.wardens import being_killed, runs_warden


def test_a_process_with_a_sigkill_pending_is_being_killed() -> None:
    """A stopped process runs no exit path: the SIGKILL sent to it stays pending, as it does
    for a busy machine's process that its own warden just killed."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not being_killed(p.pid) and not runs_warden(p.pid)
        os.kill(p.pid, signal.SIGSTOP)
        wait_for(lambda: (stat_fields(p.pid) or [b""])[0] == b"T", 30, 0.01, "the process to stop")
        os.kill(p.pid, signal.SIGKILL)
        assert being_killed(p.pid)
    finally:
        p.kill()
        p.wait()
    assert not being_killed(p.pid)  # gone
    assert not being_killed(os.getpid())
