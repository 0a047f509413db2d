"""``memwarden run -- CMD`` with real child processes that really allocate."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cgroups import memory_cgroup
from conftest import wait_for
from memwarden.supervise import EarlyExits, exit_status, redact, settings, status_text
from memwarden.units import SettingError

CHILD = str(Path(__file__).parent / "programs" / "child.py")
MEMWARDEN = [sys.executable, "-c", "from memwarden.cli import main; main()"]
MB = 1000 * 1000


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def alive(pid: int) -> bool:
    """``pid`` runs and is one of ours (a python of this test), not a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return state != "Z" and (b"child.py" in cmdline or b"time.sleep" in cmdline)


class Run:
    """``memwarden run`` as a real process; records of its child in ``record``."""

    def __init__(self, tmp: Path, run_args: list[str], child_args: list[str], **popen: Any):
        self.record = tmp / "record.jsonl"
        self.journal = tmp / "journal.jsonl"
        self.log = tmp / "run.log"
        argv = [*MEMWARDEN, "run", "--journal", str(self.journal), *run_args, "--"]
        argv += [sys.executable, CHILD, "--record", str(self.record), *child_args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
        env.pop("DYNO", None)
        env.update(popen.pop("env", {}))
        with open(self.log, "wb") as out:
            popen.setdefault("stderr", out)
            self.proc = subprocess.Popen(argv, stdout=out, env=env, **popen)

    def events(self, event: str, pid: int | None = None) -> list[dict[str, Any]]:
        return [r for r in records(self.record) if r["event"] == event and pid in (None, r["pid"])]

    def starts(self, n: int, timeout: float = 60) -> list[int]:
        wait_for(lambda: len(self.events("start")) >= n, timeout, what=f"{n} starts")
        return [r["pid"] for r in self.events("start")]

    def journal_events(self, event: str, pid: int | None = None) -> list[dict[str, Any]]:
        return [r for r in records(self.journal) if r["event"] == event and pid in (None, r["pid"])]

    def family(self, pid: int) -> list[int]:
        return [pid] + [r["child"] for r in self.events("spawned", pid)]

    def all_pids(self) -> list[int]:
        return [r["pid"] for r in self.events("start")] + [
            r["child"] for r in self.events("spawned")
        ]

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.all_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def runs(tmp_path: Path):
    made: list[Run] = []

    def make(run_args: list[str], child_args: list[str], **popen: Any) -> Run:
        sub = tmp_path / f"run{len(made)}"
        sub.mkdir()
        made.append(Run(sub, run_args, child_args, **popen))
        return made[-1]

    yield make
    for r in made:
        r.cleanup()


FAST = ["--grace", "0", "--min-uptime", "0", "--interval", "0.1"]


def test_growing_child_is_stopped_gracefully_and_restarted_without_orphans(runs) -> None:
    run = runs(
        ["--soft-limit", "80MB", "--measure", "tree", "--shutdown-timeout", "30", *FAST],
        ["--grow", "40", "--grandchildren", "2", "--escaped", "1", "--term-exit", "3"],
    )
    first, second = run.starts(2)[:2]
    # The first lifetime got its stop signal once, and left by itself (no SIGKILL).
    assert [r["signal"] for r in run.events("signal", first)] == ["SIGTERM"]
    assert run.events("exit", first) == [{**run.events("exit", first)[0], "status": 3}]
    restart = run.journal_events("restart", first)
    assert len(restart) == 1 and restart[0]["gauge"] == "tree"
    assert restart[0]["total"] >= 80 * MB and restart[0]["limit"] == 80 * MB
    assert run.journal_events("kill", first) == []
    # Its children (one in its own session) were gone before the next lifetime began.
    assert len(run.family(first)) == 3
    assert [p for p in run.family(first) if alive(p)] == []
    exits = run.journal_events("exit", first)
    assert exits[0]["why"] == "restart" and exits[0]["status"] == 3
    # Asked to stop: the current lifetime gets SIGTERM, run exits with its status.
    wait_for(lambda: len(run.events("spawned", second)) == 2, 30, what="second family")
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 3
    assert [p for p in run.all_pids() if alive(p)] == []
    samples = run.journal_events("sample", first)
    assert samples and all(s["limit"] == 80 * MB for s in samples)


def test_child_ignoring_its_stop_signal_is_killed_with_its_whole_tree(runs) -> None:
    run = runs(
        ["--soft-limit", "80MB", "--measure", "tree", "--shutdown-timeout", "1.5", *FAST],
        ["--grow", "40", "--ignore-term", "--grandchildren", "2", "--escaped", "1"],
    )
    first = run.starts(2)[0]
    assert [r["signal"] for r in run.events("signal", first)] == ["SIGTERM"]
    assert run.events("exit", first) == []  # it never left by itself
    kill = run.journal_events("kill", first)
    assert len(kill) == 1 and "1.5s after SIGTERM" in kill[0]["reason"]
    assert run.journal_events("exit", first)[0]["how"] == "killed by SIGKILL"
    assert [p for p in run.family(first) if alive(p)] == []
    # Stopping run: the stubborn child is killed after the timeout; status 128 + 9.
    wait_for(lambda: len(run.events("spawned", run.starts(2)[1])) == 2, 30, what="family")
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 137
    assert [p for p in run.all_pids() if alive(p)] == []


def test_child_dying_young_is_backed_off_then_run_gives_up(runs) -> None:
    run = runs(
        ["--min-uptime", "30", "--max-early-exits", "3", "--soft-limit", "1GB"], ["--exit", "4"]
    )
    assert run.wait() == 4
    starts = [r["t"] for r in run.events("start")]
    assert len(starts) == 3
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0  # 1 s, then 2 s of back-off
    assert "died young 3 times" in run.output() and "giving up with status 4" in run.output()
    assert run.journal_events("give_up")[0]["status"] == 4


def test_sigterm_reaches_the_command_once_and_run_exits_with_its_status(runs) -> None:
    run = runs(
        ["--soft-limit", "1GB", "--shutdown-timeout", "30"],
        ["--term-exit", "7", "--term-delay", "1"],
    )
    pid = run.starts(1)[0]
    run.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: run.events("signal", pid), 30, what="the forwarded SIGTERM")
    run.proc.send_signal(signal.SIGTERM)  # a second one is not passed on
    assert run.wait() == 7
    assert [r["signal"] for r in run.events("signal", pid)] == ["SIGTERM"]
    assert len(run.events("start")) == 1


def test_on_heroku_the_platform_sigterm_is_not_doubled(runs) -> None:
    run = runs(
        ["--soft-limit", "1GB", "--shutdown-timeout", "30"],
        ["--term-exit", "9", "--term-delay", "1"],
        env={"DYNO": "worker.1"},
    )
    pid = run.starts(1)[0]
    os.kill(pid, signal.SIGTERM)  # the dyno manager signals every process
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 9
    assert [r["signal"] for r in run.events("signal", pid)] == ["SIGTERM"]
    assert "not passed on (Heroku" in run.output()


def test_live_status_line_on_a_terminal(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    run = Run(tmp_path, ["--soft-limit", "500MB", "--interval", "0.1"], [], stderr=slave)
    os.close(slave)
    seen = b""
    try:

        def status_shown() -> bool:
            nonlocal seen
            import select

            while select.select([master], [], [], 0.05)[0]:
                seen += os.read(master, 4096)
            return b"\r\x1b[K" in seen and b"/ 476.8 MiB" in seen and b"restarts 0" in seen

        wait_for(status_shown, 30, what="a status line")
        run.starts(1)
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait() == 0
    finally:
        run.cleanup()
        os.close(master)


def test_bad_option_names_the_env_var(tmp_path: Path) -> None:
    out = subprocess.run(
        [*MEMWARDEN, "run", "--soft-limit", "lots", "--", "true"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "MEMWARDEN_SOFT_LIMIT='lots'" in out.stderr and "for example" in out.stderr


def test_settings_options_over_env_over_defaults() -> None:
    env = {"MEMWARDEN_SOFT_LIMIT": "100MB", "MEMWARDEN_GRACE": "5"}
    got = settings(env)
    assert got.limits.soft == 100 * MB and got.config.grace == 5 and got.limits.reclaim is False
    got = settings(env, soft_limit="200MB", grace=None)
    assert got.limits.soft == 200 * MB and got.config.grace == 5
    assert settings({"MEMWARDEN_QUOTA": "1GB"}).limits.hard == int(1e9 * 0.95)
    assert settings({}, quota="1GB", soft_limit="50%").limits.soft == 500 * MB
    assert settings({"DYNO": "worker.1"}).forward_sigterm is False
    assert settings({}).forward_sigterm is True
    assert settings({"MEMWARDEN_MAX_EARLY_EXITS": "9"}).max_early_exits == 9
    with pytest.raises(SettingError, match="MEMWARDEN_MAX_EARLY_EXITS"):
        settings({"MEMWARDEN_MAX_EARLY_EXITS": "many"})
    with pytest.raises(SettingError, match="MEMWARDEN_GRACE"):
        settings({"MEMWARDEN_GRACE": "soon"})
    with pytest.raises(SettingError, match="MEMWARDEN_HARD_LIMIT"):
        settings({}, soft_limit="2GB", hard_limit="1GB")


def test_early_exits_back_off_doubles_and_caps() -> None:
    early = EarlyExits(young=30, cap=4, window=3600)
    assert [early.exited(1, t) for t in (0, 1, 2)] == [1.0, 2.0, 4.0]
    assert early.exited(100, 200) == 0.0  # a long life resets the back-off...
    assert early.exited(1, 300) is None  # ...but the window still counts 4 early exits
    late = EarlyExits(young=30, cap=2, window=10)
    assert late.exited(1, 0) == 1.0 and late.exited(1, 100) == 2.0  # the first left the window
    assert EarlyExits(young=1, cap=99, window=1e9, in_a_row=20).exited(0, 0) == 60.0


def test_exit_status_and_status_text() -> None:
    assert exit_status(3) == 3 and exit_status(-signal.SIGKILL) == 137
    assert exit_status(-signal.SIGTERM) == 143
    limits = settings({}, soft_limit="400MiB").limits
    text = status_text(100 * 1024 * 1024, limits, 2, 65.0, "celery")
    assert text == "celery  100.0 MiB / 400.0 MiB (25%)  restarts 2  up 1m05s"
    assert "starting" in status_text(None, limits, 0, 0.0)


@pytest.mark.slow
def test_restarts_before_the_kernel_oom_kills_in_a_real_cgroup(runs, tmp_path: Path) -> None:
    limit = 256 * 1024 * 1024
    with memory_cgroup(limit) as dyno:
        # Guarded: the cgroup is memwarden's quota, measured by its working set.
        run = runs(["--soft-limit", "50%", *FAST], ["--grow", "40"], preexec_fn=dyno.join)
        run.starts(3, timeout=90)
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait() == 0
        restarts = run.journal_events("restart")
        assert len(restarts) >= 2 and {r["gauge"] for r in restarts} == {"cgroup"}
        assert all(r["total"] < limit for r in restarts)
        assert dyno.oom_kills() == 0
    with memory_cgroup(limit) as bare:
        # The same command alone: the kernel kills it.
        record = tmp_path / "alone.jsonl"
        alone = subprocess.Popen(
            [sys.executable, CHILD, "--record", str(record), "--grow", "40"],
            preexec_fn=bare.join,
        )
        try:
            assert alone.wait(90) == -signal.SIGKILL
        finally:
            alone.kill()
        assert bare.oom_kills() >= 1


def test_a_command_that_cannot_start_is_status_127(tmp_path: Path) -> None:
    out = subprocess.run(
        [*MEMWARDEN, "run", "--soft-limit", "1GB", "--", str(tmp_path / "no-such-worker")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 127 and "cannot start" in out.stderr


def test_sighup_is_passed_on_and_run_keeps_supervising(runs) -> None:
    run = runs(["--soft-limit", "1GB", "--interval", "0.1"], ["--term-exit", "5"])
    pid = run.starts(1)[0]
    run.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: run.events("signal", pid), 30, what="the SIGHUP")
    assert run.proc.poll() is None  # the command took it in its stride; so does run
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 5
    assert [r["signal"] for r in run.events("signal", pid)] == ["SIGHUP", "SIGTERM"]


def test_dry_run_decides_and_records_but_never_signals(runs) -> None:
    run = runs(
        ["--soft-limit", "60MB", "--measure", "tree", "--dry-run", *FAST],
        ["--grow", "40", "--upto", "90", "--term-exit", "6"],
    )
    pid = run.starts(1)[0]
    wait_for(lambda: run.journal_events("restart"), 60, what="a dry-run restart record")
    restart = run.journal_events("restart")[0]
    assert restart["dry_run"] is True and restart["pid"] == pid
    assert run.events("signal", pid) == [] and len(run.events("start")) == 1
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 6


def test_command_lines_are_redacted_for_logs_and_journal() -> None:
    argv = [
        "celery",
        "-b",
        "redis://:hunter2@cache:6379/0",
        "--api-key",
        "k3y",
        "--token=t0k",
        "-A",
        "proj",
        "worker",
        "amqp://guest:guest@mq//",
    ]
    shown = redact(argv)
    assert shown == [
        "celery",
        "-b",
        "redis://:***@cache:6379/0",
        "--api-key",
        "***",
        "--token=***",
        "-A",
        "proj",
        "worker",
        "amqp://guest:***@mq//",
    ]
    assert not any(s in " ".join(shown) for s in ("hunter2", "k3y", "t0k"))
