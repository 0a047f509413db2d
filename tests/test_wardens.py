"""Which sibling processes will take a hard kill: ``memwarden.wardens``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cgroups import memory_cgroup
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


def test_an_idle_warden_is_not_killed_for_a_sibling_killed_as_it_read() -> None:
    """Sibling worker processes under one cgroup figure (Dramatiq's, Huey's in a cgroup):
    the larger one's warden kills it, and its consumer reaps it, between an idle sibling's
    reading (over the hard limit with the larger one's memory in it) and its look for a
    larger sibling. The idle warden found none and killed its own process, with no job in
    hand and the memory already given back. Real processes in a real memory cgroup."""
    script = Path(__file__).parent / "apps" / "sibling_killed.py"
    with memory_cgroup(512 * 2**20) as cg:
        out = subprocess.run(
            [sys.executable, str(script), "150MiB"],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=cg.join,
        )
        oom_kills = cg.oom_kills()
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert oom_kills == 0
    kills = [r for r in result["records"] if r["event"] == "kill"]
    assert result["decided"] == "KILL", result  # over the hard limit at its reading
    assert kills == [] and result["idle"] == 0, result
