"""Issue 15, items 6 and 7: a full disk never loses the host lock for good; an unusable
state dir never stops a restart, never floods the log, and ``check`` says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from faultkit import clean_env, fill, run_victim, tmpfs

from memwarden.coordination import HostLock

MEMWARDEN = [sys.executable, "-c", "from memwarden.cli import main; main()"]
TAKE = (
    "import sys; from memwarden.coordination import HostLock; "
    "print(HostLock(sys.argv[1]).try_acquire())"
)


def other_warden_takes(lock: Path) -> bool:
    """Whether another process (another warden sharing the dir) gets the lock now."""
    out = subprocess.run(
        [sys.executable, "-c", TAKE, str(lock)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


def test_a_full_disk_never_keeps_the_host_lock_for_good(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", size="64k") as state:
        fill(state)
        lock = HostLock(str(state / "lock"))
        assert lock.try_acquire() is True  # the pid cannot be written: the flock holds
        assert not other_warden_takes(state / "lock")
        lock.release()
        assert other_warden_takes(state / "lock")
        assert lock.try_acquire() is True
        lock.release()


def test_a_warden_on_a_full_disk_restarts(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", size="64k") as state:
        fill(state)
        victim = run_victim(
            tmp_path / "journal.jsonl", "--watch", "1", MEMWARDEN_STATE_DIR=str(state)
        )
    assert victim.status == 0, victim.stderr
    assert victim.report["restarted"], victim.stderr
    assert victim.report["tracebacks"] == 0, victim.stderr


def test_an_unusable_state_dir_restarts_anyway_and_says_it_once(tmp_path: Path) -> None:
    victim = run_victim(
        tmp_path / "journal.jsonl",
        "--break-state",
        "--watch",
        "3",
        MEMWARDEN_STATE_DIR=str(tmp_path / "state"),
    )
    assert victim.status == 0, victim.stderr
    assert victim.report["restarted"], victim.stderr
    assert victim.report["tracebacks"] == 0, victim.stderr
    assert victim.report["errors"] <= 2, victim.stderr
    assert "host lock" in victim.stderr and "unusable" in victim.stderr


def test_check_says_when_the_state_dir_is_unusable(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "state", size="64k", read_only=True) as state:
        out = subprocess.run(
            [*MEMWARDEN, "check", "--json"],
            env=clean_env(MEMWARDEN_STATE_DIR=str(state), MEMWARDEN_QUOTA="2GB"),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["state_dir"] == str(state)
    assert any(str(state) in w and "files cannot be made" in w for w in report["warnings"])
