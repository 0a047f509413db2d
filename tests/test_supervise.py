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
from memwarden import redact
from memwarden.supervisor.run import EarlyExits, exit_status, settings, status_text
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
# A child that grows to a ceiling from its first moment can end a start-up slowed by a busy
# machine already there: run then judges it "starts over its soft limit" (no restart). The
# tests about restarts of a grower give it ``--idle-first`` seconds to start.


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
    assert kill[0]["cause"] == "shutdown_overrun"
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
    text = status_text(None, limits, 3, 1.0, "sidekiq", kills=1, oom_kills=2)
    assert text == "sidekiq  starting  restarts 3 (1 hard kill)  OOM kills 2  up 1.0s"


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
        ["--grow", "40", "--upto", "90", "--term-exit", "6", "--idle-first", "2"],
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
    shown = redact.argv(argv)
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


def status_lines(run: Run) -> list[str]:
    """The plain status lines ``run`` logged (one at every lifetime's end off a terminal)."""
    return [ln for ln in run.output().splitlines() if "  restarts " in ln]


def test_own_kills_never_make_run_give_up_and_the_status_counts_them(runs) -> None:
    # Every lifetime grows 100 MiB/s past a 60 MB hard limit, young: run kills it, again and
    # again. Those are run's own kills, not the command failing by itself.
    run = runs(
        [
            *["--soft-limit", "40MB", "--hard-limit", "60MB", "--measure", "tree"],
            *["--max-early-exits", "2", "--min-uptime", "30", "--shutdown-timeout", "0.5"],
        ],
        ["--grow", "100", "--ignore-term"],
    )
    run.starts(5, timeout=90)
    assert run.proc.poll() is None, run.output()
    assert run.journal_events("give_up") == [] and "giving up" not in run.output()
    run.proc.send_signal(signal.SIGTERM)
    run.wait()
    ended = [e for e in run.journal_events("exit") if e["why"] != "stopped"]
    assert len(ended) >= 4 and all(e["how"] == "killed by SIGKILL" for e in ended)
    # The status line counts every lifetime run replaced, the killed ones too.
    last = status_lines(run)[-1]
    assert f"restarts {len(ended)} ({len(ended)} hard kills)" in last, last


def test_a_command_that_starts_over_its_soft_limit_is_said_and_not_restarted(runs) -> None:
    # 100 MiB at once, then flat: restarting it cannot help. The start is judged once the
    # command has settled (not on the reading taken while it execs).
    run = runs(
        ["--soft-limit", "60MB", "--measure", "tree", *FAST],
        ["--grow", "4000", "--upto", "100", "--term-exit", "4"],
    )
    run.starts(1)
    wait_for(lambda: "over its soft limit" in run.output(), 60, what="the start-up alarm")
    assert "restarts cannot bring it under" in run.output()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 4
    assert len(run.events("start")) == 1 and run.journal_events("restart") == []


def test_drain_signal_first_then_the_stop_signal_soon(runs) -> None:
    # Default grace (120 s): the drained command stops growing, and its stop signal follows
    # once memory has stopped rising, not a grace later.
    run = runs(
        [
            *["--soft-limit", "60MB", "--measure", "tree", "--drain-signal", "TSTP"],
            *["--min-uptime", "0", "--shutdown-timeout", "30"],
        ],
        ["--grow", "40", "--quiet-on-tstp", "--term-exit", "3"],
    )
    first = run.starts(2, timeout=60)[0]
    assert [r["signal"] for r in run.events("signal", first)] == ["SIGTSTP", "SIGTERM"]
    drain = run.journal_events("drain", first)
    assert len(drain) == 1 and drain[0]["signal"] == "SIGTSTP" and drain[0]["total"] >= 60 * MB
    restart = run.journal_events("restart", first)
    assert len(restart) == 1 and "no longer rising" in restart[0]["reason"]
    assert restart[0]["cause"] == "drained"
    assert drain[0]["cause"] == "grace"  # the decision that paused: over the soft limit
    assert run.journal_events("kill") == []
    assert run.journal_events("exit", first)[0]["status"] == 3
    run.proc.send_signal(signal.SIGTERM)
    run.wait()


def test_drain_signal_from_the_env_and_a_drained_command_that_goes_on_growing(runs) -> None:
    # The command ignores the drain (no handler for SIGTERM's cousin here: SIGHUP) and keeps
    # growing: the policy's growth-aware restart sends the stop signal soon.
    run = runs(
        [
            *["--soft-limit", "60MB", "--hard-limit", "400MB", "--measure", "tree"],
            *["--min-uptime", "0", "--shutdown-timeout", "30"],
        ],
        ["--grow", "40", "--term-exit", "3"],
        env={"MEMWARDEN_DRAIN_SIGNAL": "SIGHUP"},
    )
    first = run.starts(2, timeout=60)[0]
    assert [r["signal"] for r in run.events("signal", first)] == ["SIGHUP", "SIGTERM"]
    assert len(run.journal_events("drain", first)) == 1
    assert run.journal_events("kill") == []
    run.proc.send_signal(signal.SIGTERM)
    run.wait()


def test_the_restart_cap_is_said_once_an_episode(runs) -> None:
    run = runs(
        ["--soft-limit", "40MB", "--measure", "tree", "--max-restarts", "0", *FAST],
        ["--grow", "40", "--upto", "120", "--term-exit", "5", "--idle-first", "2"],
    )
    run.starts(1)
    wait_for(lambda: run.journal_events("sample") and "restarts in the last" in run.output(), 60)
    # Growing on from 40 to 120 MB: a new reading over the limit every 20 ms.
    wait_for(lambda: max(s["total"] for s in run.journal_events("sample")) > 110 * MB, 60)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 5
    assert run.output().count("restarts in the last") == 1, run.output()


def test_drain_signal_must_differ_from_the_stop_signal() -> None:
    assert settings({}, drain_signal="TSTP").drain_signal == signal.SIGTSTP
    assert settings({"MEMWARDEN_DRAIN_SIGNAL": "SIGUSR1"}).drain_signal == signal.SIGUSR1
    assert settings({}).drain_signal is None
    with pytest.raises(SettingError, match="MEMWARDEN_DRAIN_SIGNAL"):
        settings({}, drain_signal="TERM")
    with pytest.raises(SettingError, match="MEMWARDEN_DRAIN_SIGNAL"):
        settings({"MEMWARDEN_DRAIN_SIGNAL": "SIGNOPE"})


@pytest.mark.slow
def test_the_kernel_oom_kill_is_said_and_not_the_command_failing(runs) -> None:
    # Limits set above the cgroup's: the kernel kills first, every time. run says so, counts
    # it, and does not give up on a command that never failed by itself.
    with memory_cgroup(128 * 1024 * 1024) as dyno:
        run = runs(
            ["--soft-limit", "1GB", "--hard-limit", "2GB", "--max-early-exits", "1"],
            ["--grow", "400", "--runaway"],
            preexec_fn=dyno.join,
        )
        run.starts(3, timeout=90)
        wait_for(lambda: len(run.journal_events("oom_kill")) >= 2, 60, what="2 oom_kill events")
        assert run.proc.poll() is None and run.journal_events("give_up") == []
        assert "killed by the kernel's OOM killer" in run.output()
        ends = [e for e in run.journal_events("exit")]
        assert ends and all(e["why"] == "oom_kill" for e in ends[:2])
        run.proc.send_signal(signal.SIGTERM)
        run.wait()
        assert "OOM kills" in status_lines(run)[-1]
        assert dyno.oom_kills() >= 2


@pytest.mark.slow
def test_the_kernel_oom_kill_of_another_process_is_said_and_the_command_goes_on(runs) -> None:
    with memory_cgroup(128 * 1024 * 1024) as dyno:
        run = runs(
            ["--soft-limit", "1GB", "--hard-limit", "2GB", "--interval", "0.1"],
            ["--hog", "400", "--term-exit", "3"],
            preexec_fn=dyno.join,
        )
        pid = run.starts(1)[0]
        wait_for(lambda: run.journal_events("oom_kill"), 60, what="an oom_kill event")
        kill = run.journal_events("oom_kill")[0]
        assert kill["pid"] == pid and kill["victim"] == "a process of the command"
        assert "the kernel's OOM killer killed 1 process(es)" in run.output()
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait() == 3
        assert len(run.events("start")) == 1
        assert "OOM kills 1" in status_lines(run)[-1]


@pytest.mark.slow
def test_a_runaway_allocation_is_killed_by_run_before_the_kernel(runs) -> None:
    # As fast as this machine allocates, 1 MiB objects, from its first moment, in a 128 MiB
    # cgroup with the default limits: the soft-to-hard window is ~19 MiB, ~20 ms at 1 GiB/s
    # (the 2 GiB/s in 256 MiB, on a machine that allocates half as fast). Seven
    # lifetimes, seven kills by run, none by the kernel (before: it won 3 in 10).
    with memory_cgroup(128 * 1024 * 1024) as dyno:
        run = runs([], ["--grow", "4096", "--runaway"], preexec_fn=dyno.join)
        run.starts(8, timeout=120)
        run.proc.send_signal(signal.SIGTERM)
        run.wait()
        kills = run.journal_events("kill")
        assert dyno.oom_kills() == 0, run.output()
        assert len(kills) >= 7 and run.journal_events("oom_kill") == []


def test_restarts_that_cure_are_not_capped(runs) -> None:
    # A command that starts low and grows is cured by each restart: however many it needs,
    # they do not count towards --max-restarts (only restarts of a lifetime that starts near
    # its limit loop).
    run = runs(
        ["--soft-limit", "60MB", "--measure", "tree", "--max-restarts", "1", *FAST],
        ["--grow", "60", "--term-exit", "3"],
    )
    run.starts(4, timeout=90)
    run.proc.send_signal(signal.SIGTERM)
    run.wait()
    assert "restarts in the last" not in run.output()
    assert len(run.journal_events("restart")) >= 3 and run.journal_events("kill") == []


def test_replaced_lifetimes_back_off_only_when_they_loop() -> None:
    early = EarlyExits(young=30, cap=1, window=3600)
    assert [early.replaced(False) for _ in range(9)] == [0.0] * 9
    assert [early.replaced(True) for _ in range(3)] == [1.0, 2.0, 4.0]
    assert early.replaced(False) == 0.0 and early.replaced(True) == 1.0
    assert early.times == []  # never counted towards giving up


def test_a_command_that_leaves_on_its_drain_signal_is_restarted_not_given_up_on(runs) -> None:
    # Its drain signal (here SIGTERM, the stop signal being SIGQUIT) makes it exit at once,
    # young: that exit is run's doing, not the command failing. The hard limit is far: a
    # command slow to take its signal on a busy machine is not killed (an exit "kill").
    run = runs(
        [
            *["--soft-limit", "60MB", "--hard-limit", "2GB", "--measure", "tree"],
            *["--drain-signal", "SIGTERM"],
            *["--stop-signal", "SIGQUIT", "--min-uptime", "30", "--max-early-exits", "1"],
        ],
        ["--grow", "60", "--term-exit", "3"],
    )
    run.starts(3, timeout=90)
    assert run.proc.poll() is None and "giving up" not in run.output()
    run.proc.send_signal(signal.SIGTERM)
    run.wait()
    assert {e["why"] for e in run.journal_events("exit")[:2]} == {"restart"}


def test_run_takes_a_higher_priority_where_it_may_and_the_command_keeps_its_own(runs) -> None:
    # A guard woken late on a busy machine loses to a runaway: run raises its own priority
    # (nice -10, as earlyoom does) where allowed; the command runs at the nice run was given.
    run = runs(["--soft-limit", "1GB"], ["--term-exit", "3"])
    run.starts(1)
    with open(f"/proc/{run.proc.pid}/stat") as f:
        run_nice = int(f.read().rpartition(")")[2].split()[16])
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert run.events("start")[0]["nice"] == mine
    assert run_nice == (-10 if os.geteuid() == 0 and mine > -10 else mine)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 3
