"""Issue 15, item 13: ``memwarden run`` SIGKILLed leaves its command's descendants running
(re-parented to pid 1), against the README's "never left behind". Where memory cgroups are
writable, ``run`` puts the command's tree in a child cgroup of its own and the next ``run``
started beside it cleans up what a killed one left. A real cgroup, real processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from faultkit import clean_env

from cgroups import memory_cgroup
from conftest import wait_for

CHILD = str(Path(__file__).parent.parent / "programs" / "child.py")
MEMWARDEN = [sys.executable, "-c", "from memwarden.cli import main; main()"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_run(cg, tmp: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    record = tmp / f"{name}.jsonl"
    argv = [*MEMWARDEN, "run", "--soft-limit", "1GB", "--journal", str(tmp / f"{name}.j")]
    argv += ["--", sys.executable, CHILD, "--record", str(record)]
    argv += ["--grandchildren", "3", "--escaped", "2"]
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(argv, stdout=log, stderr=log, env=clean_env(), preexec_fn=cg.join)
    return proc, record


def test_a_killed_runs_descendants_are_gone_once_run_starts_again(tmp_path: Path) -> None:
    left: list[int] = []
    with memory_cgroup(2 << 30) as cg:
        first, record = start_run(cg, tmp_path, "first")
        second = None
        try:
            wait_for(lambda: len([r for r in records(record) if r["event"] == "spawned"]) == 3, 60)
            family = [r["pid"] for r in records(record) if r["event"] == "start"]
            family += [r["child"] for r in records(record) if r["event"] == "spawned"]
            first.send_signal(signal.SIGKILL)
            first.wait(30)
            second, record2 = start_run(cg, tmp_path, "second")
            wait_for(lambda: any(r["event"] == "start" for r in records(record2)), 60)
            try:
                wait_for(lambda: not any(alive(p) for p in family), 30, what="no orphan")
            except AssertionError:
                left = [p for p in family if alive(p)]
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(30)
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(10)
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    assert left == [], f"{len(left)} descendants of the killed run still running: {left}"
