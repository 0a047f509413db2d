"""``memwarden run`` and a command that tells it its jobs (:mod:`memwarden.command`).

A real worker (``tests/programs/job_worker.py``, two threads, a directory for a queue) in a
real memory cgroup with memwarden's default limits; one job in the batch grows without end.
``run`` names the jobs in hand at each hard kill, quarantines the poison job after
``MEMWARDEN_POISON_KILLS`` (3) kills, and the worker skips it from then on; every other job
is done; one ``job`` record per job for ``memwarden diagnose``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from cgroups import memory_cgroup
from conftest import wait_for
from memwarden import command
from memwarden.journal import Journal
from memwarden.supervisor.jobs import JobLedger
from test_supervise import MEMWARDEN, records

WORKER = str(Path(__file__).parent / "programs" / "job_worker.py")
MiB = 1024 * 1024


def lines(path: Path, verb: str) -> list[str]:
    if not path.exists():
        return []
    return [ln.split()[1] for ln in path.read_text().splitlines() if ln.startswith(verb + " ")]


def run_worker(
    tmp_path: Path,
    kinds: dict[str, str],
    done: Callable[[Path], bool],
    limit: int | None = None,
    env: dict[str, str] | None = None,
    threads: int = 2,
) -> tuple[list[dict[str, Any]], int, str]:
    """``kinds`` (job id -> kind) queued for the job worker under ``memwarden run`` (in a
    memory cgroup of ``limit`` bytes, default settings otherwise); SIGTERM once ``done(tmp)``.
    Returns run's journal records, the cgroup's OOM kills and run's log."""
    queue, journal, log = tmp_path / "queue", tmp_path / "journal.jsonl", tmp_path / "run.log"
    queue.mkdir()
    for job_id, kind in kinds.items():
        (queue / job_id).write_text(kind)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    clean.pop("DYNO", None)
    clean.update(MEMWARDEN_STATE_DIR=str(tmp_path / "state"), **(env or {}))
    argv = [*MEMWARDEN, "run", "--journal", str(journal), "--no-status", "--"]
    argv += [sys.executable, WORKER, "--queue", str(queue), "--record", str(tmp_path / "record")]
    argv += ["--threads", str(threads)]
    with contextlib.ExitStack() as stack:
        dyno = stack.enter_context(memory_cgroup(limit)) if limit is not None else None
        out = stack.enter_context(open(log, "wb"))
        run = subprocess.Popen(
            argv, env=clean, stdout=out, stderr=out, preexec_fn=dyno.join if dyno else None
        )
        try:
            wait_for(lambda: done(tmp_path), 240, 0.2, "the jobs done")
            run.send_signal(signal.SIGTERM)
            assert run.wait(60) == 0
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(10)
        oom_kills = dyno.oom_kills() if dyno is not None else 0
    return records(journal), oom_kills, log.read_text()


def all_done(ids: Iterable[str]) -> Callable[[Path], bool]:
    return lambda tmp: set(lines(tmp / "record", "done")) >= set(ids)


@pytest.mark.slow
def test_the_poison_job_is_quarantined_and_no_other_job_is_lost(tmp_path: Path) -> None:
    ids = {f"job-{n:03d}": "light" if n % 3 else "leak" for n in range(60)}
    ids["job-010"] = "poison"
    others = all_done(set(ids) - {"job-010"})
    events, oom_kills, log = run_worker(
        tmp_path,
        ids,
        lambda tmp: others(tmp) and (tmp / "queue.dead" / "job-010").exists(),
        limit=256 * MiB,
    )
    assert oom_kills == 0, log[-3000:]
    kills = [e for e in events if e["event"] == "kill"]
    # Every kill names the poison job in hand; it is poison at the third, then skipped.
    assert len(kills) == 3, kills
    assert all("job-010" in {j["job_id"] for j in k["in_flight"]} for k in kills)
    quarantined = [(e["job_id"], e["kills"]) for e in events if e["event"] == "quarantine"]
    assert quarantined == [("job-010", 3)]
    skipped = [e for e in events if e["event"] == "skip"]
    assert [(e["job_id"], e["job"]) for e in skipped] == [("job-010", "poison")]
    # No other job was ever quarantined; every one ran to its end, and has its job record
    # with the kind it was told by and the RSS of the process that ran it.
    assert "job-010" not in lines(tmp_path / "record", "done")
    jobs = {e["job_id"]: e for e in events if e["event"] == "job"}
    assert set(jobs) == set(ids) - {"job-010"}
    assert {e["job"] for e in jobs.values()} == {"light", "leak"}
    assert all(e["rss_after"] > 0 and e["framework"] == "run" for e in jobs.values())
    state = tmp_path / "state"
    assert sorted(p.name for p in state.iterdir() if p.name.startswith("run-")) == []


@pytest.mark.slow
def test_a_command_taking_jobs_from_its_first_moment_is_restarted_not_killed(
    tmp_path: Path,
) -> None:
    # A full queue at start: the worker grows ~150 MiB/s from its first second. Its first
    # job ends its start-up (before, only the hard limit acted for its first 2 s of CPU,
    # and the growth met it: a kill with the jobs in hand). Default limits, 256 MiB.
    ids = {f"job-{n:03d}": "leak" for n in range(120)}
    events, oom_kills, log = run_worker(tmp_path, ids, all_done(ids), limit=256 * MiB)
    assert oom_kills == 0, log[-3000:]
    assert [e for e in events if e["event"] == "kill"] == [], log[-3000:]
    restarts = [e for e in events if e["event"] == "restart"]
    assert len(restarts) >= 2  # 480 MiB kept in all: two lifetimes at least were full
    assert all(e["in_flight"] or "no job in hand" in e["reason"] for e in restarts)


def test_outside_run_the_calls_do_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(command.JOBS_ENV, raising=False)
    monkeypatch.delenv(command.QUARANTINE_ENV, raising=False)
    with command.job("a b", "kind"):
        pass
    assert command.tell("start", "x") is False
    assert command.quarantined("x") is False
    assert command.word("a b\tc") == "a_b_c" and command.word("") == "-"


def test_a_spool_left_by_a_run_that_is_gone_is_taken_over(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    old = tmp_path / f"run-{gone.pid}.spool"
    old.mkdir()
    (old / "abc.json").write_text('{"jid": "abc"}')
    (tmp_path / f"run-{gone.pid}.jobs").write_text("")
    live = tmp_path / f"run-{os.getppid()}.spool"  # a run that is alive keeps its own
    live.mkdir()
    (live / "def.json").write_text("{}")
    ledger = JobLedger(str(tmp_path), Journal(None), poison_kills=3)
    try:
        assert sorted(os.listdir(ledger.spool)) == ["abc.json"]
        assert not old.exists() and not (tmp_path / f"run-{gone.pid}.jobs").exists()
        assert (live / "def.json").exists()
    finally:
        os.unlink(os.path.join(ledger.spool, "abc.json"))
        ledger.close()
    assert not os.path.exists(ledger.spool) and not os.path.exists(ledger.fifo_path)


def test_messages_cut_or_foreign_are_ignored_and_whole_ones_taken(tmp_path: Path) -> None:
    journal = tmp_path / "j.jsonl"
    ledger = JobLedger(str(tmp_path), Journal(str(journal)), poison_kills=2)
    try:
        fd = os.open(ledger.fifo_path, os.O_WRONLY | os.O_NONBLOCK)
        me = os.getpid()
        os.write(fd, f"garbage\nstart x y\nstart {me} j1 send_mail\nstart {me} j2 ".encode())
        ledger.read()
        assert [j["job_id"] for j in ledger.in_flight()] == ["j1"] and ledger.busy
        os.write(fd, f"resize\nend {me} j1 12345\n".encode())  # the cut line ends whole
        ledger.read()
        assert ledger.in_flight() == [{"job": "resize", "job_id": "j2"}]
        for _ in range(2):
            ledger.killed(ledger.in_flight())
        assert ledger.quarantined == {"j2": "resize"}
        assert Path(ledger.quarantine_path).read_text() == "j2\n"
        os.close(fd)
    finally:
        ledger.close()
    events = records(journal)
    assert [e["event"] for e in events] == ["job", "quarantine"]
    assert events[0]["job"] == "send_mail" and events[0]["rss_before"] > 0
    assert events[0]["rss_after"] == 12345  # the figure measured at the boundary


def diagnose_run_journal(tmp_path: Path, kinds: tuple[str, ...]) -> dict:
    """120 jobs of ``kinds`` in turn, one at a time, told to run; diagnose of its journal."""
    ids = {f"job-{n:03d}": kinds[n % len(kinds)] for n in range(120)}
    events, _, _ = run_worker(
        tmp_path, ids, all_done(ids), env={"MEMWARDEN_SOFT_LIMIT": "4GB"}, threads=1
    )
    jobs = [r for r in events if r["event"] == "job"]
    assert len(jobs) == len(ids) and {r["job"] for r in jobs} == set(kinds)
    out = subprocess.run(
        [*MEMWARDEN, "diagnose", "--json", str(tmp_path / "journal.jsonl")],
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kinds", "pattern"), [(("leak", "light", "light"), "leak"), (("light",), "stable")]
)
def test_diagnose_judges_a_command_under_run_from_its_journal(
    tmp_path: Path, kinds: tuple[str, ...], pattern: str
) -> None:
    # The command tells run its jobs (RSS measured at each boundary); diagnose reads run's
    # journal alone (issue 14).
    assert diagnose_run_journal(tmp_path, kinds)["pattern"] == pattern


@pytest.mark.slow
def test_diagnose_names_the_growing_kind_of_a_command_under_run(tmp_path: Path) -> None:
    found = diagnose_run_journal(tmp_path, ("leak", "light", "light"))
    assert found["suspects"][0]["job"] == "leak"
