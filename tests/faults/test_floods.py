"""Issue 15, item 8: a condition that holds is said once per episode, then at most once a
minute — restarts used up (in process and under ``run``), a journal that cannot be
written. (The unusable state dir: test_state_faults.py.)"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from faultkit import clean_env, fill, run_victim, tmpfs

from conftest import wait_for
from memwarden.journal import Journal

CHILD = str(Path(__file__).parent.parent / "programs" / "child.py")
MEMWARDEN = [sys.executable, "-c", "from memwarden.cli import main; main()"]
CAPPED = "restarts in the last"


def test_restarts_used_up_in_process_are_said_once(tmp_path: Path) -> None:
    victim = run_victim(
        tmp_path / "journal.jsonl",
        "--max-restarts",
        "0",
        "--hold",
        "5",
        MEMWARDEN_STATE_DIR=str(tmp_path / "state"),
    )
    assert victim.status == 0, victim.stderr
    assert not victim.report["restarted"]
    assert victim.stderr.count(CAPPED) == 1, victim.stderr
    assert victim.report["errors"] <= 2, victim.stderr


def test_restarts_used_up_under_run_are_said_once(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    argv = [*MEMWARDEN, "run", "--soft-limit", "40MB", "--measure", "tree"]
    argv += ["--max-restarts", "0", "--grace", "0", "--min-uptime", "0", "--interval", "0.05"]
    argv += ["--", sys.executable, CHILD, "--record", str(tmp_path / "rec.jsonl")]
    # Idle first: its start is judged under the soft limit however busy the machine (growing
    # from its first moment, a start-up slowed by a busy machine can end with the growth, and
    # run then says "starts over its soft limit": no restart, so no cap to say).
    argv += ["--grow", "40", "--upto", "100", "--term-exit", "5", "--idle-first", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, env=clean_env())
    try:
        wait_for(lambda: CAPPED in log.read_text(), 60, what="the cap said")
        time.sleep(4)  # still over the limit, growing: readings every 50 ms
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert log.read_text().count(CAPPED) == 1, log.read_text()


def test_a_journal_that_cannot_be_written_is_said_once(tmp_path: Path, caplog) -> None:
    with tmpfs(tmp_path / "fs", size="64k") as fs:
        fill(fs)
        journal = Journal(str(fs / "j.jsonl"))
        with caplog.at_level(logging.WARNING, logger="memwarden"):
            for i in range(500):
                journal.write("job", job="x", n=i, pad="p" * 200)
        journal.close()
        os.unlink(fs / "filler")
    said = [r for r in caplog.records if "not written" in r.getMessage()]
    assert len(said) == 1, len(said)
