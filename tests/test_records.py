"""The journal's schema (:mod:`memwarden.records`) against what the code writes and what
``docs/journal.md`` says: every event the code writes is a typed record, every field of it
declared; real journals conform; the page's tables are the registry's."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_for
from memwarden.events import Cause, Event, State, action_word, event_of
from memwarden.journal import Journal
from memwarden.records import RECORDS, Record, fields, journal_markdown, problems
from memwarden.supervisor.jobs import JobLedger
from test_supervise import MEMWARDEN, records

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "memwarden"
PAGE = ROOT / "docs" / "journal.md"
CHILD = str(Path(__file__).parent / "programs" / "child.py")
START, END = "<!-- records:start -->\n", "\n<!-- records:end -->"


def nonconforming(journal: list[dict[str, Any]]) -> list[tuple[list[str], dict[str, Any]]]:
    return [(p, r) for r in journal if (p := problems(r))]


# ----------------------------------------------------------------- the registry itself
def test_every_event_has_a_record_and_every_field_a_type_and_a_meaning() -> None:
    assert set(RECORDS) == set(Event)
    for event, record in RECORDS.items():
        assert record.__doc__, event
        names = [f.name for f in fields(record)]
        assert names[:3] == ["event", "ts", "pid"], event
        for f in fields(record):
            assert f.doc, f"{event.value}.{f.name} has no meaning"


def test_a_record_is_checked_for_its_event_fields_and_types() -> None:
    good = {"event": "pause", "ts": 1.5, "pid": 7, "total": 10, "limit": None}
    assert problems(good) == []
    assert problems({**good, "event": "poison"}) == ["unknown event 'poison'"]
    assert problems({**good, "limt": 3}) == ["pause: unknown field limt"]
    assert problems({k: v for k, v in good.items() if k != "total"}) == ["pause: no total"]
    assert problems({**good, "total": "10"}) == ["pause: total='10' is not int"]
    assert problems({**good, "total": True}) == ["pause: total=True is not int"]
    kill = {"event": "kill", "ts": 1, "pid": 7, "reason": "r", "total": None, "limit": 5}
    assert problems({**kill, "in_flight": [{"job": "a", "job_id": "1"}]}) == []
    assert problems({**kill, "in_flight": [{"job": "a"}]}) == [
        "kill: in_flight=[{'job': 'a'}] is not list of object"
    ]
    assert problems({**kill, "in_flight": [], "target": "parent"}) == [
        'kill: target=\'parent\' is not "child" or "horse"'
    ]


def test_old_event_names_are_read_in_todays_words() -> None:
    assert event_of({"event": "poison", "job_id": "1", "kills": 3}) == "quarantine"
    assert event_of({"event": "quarantine", "job_id": "1", "kills": 3}) == "quarantine"
    # memwarden run's skip of a quarantined job was journaled "quarantine", with no kills
    assert event_of({"event": "quarantine", "job_id": "1", "pid": 9}) == "skip"
    assert event_of({"event": "restart"}) == "restart"
    assert event_of({"event": "no_such_event"}) == "no_such_event"


def test_a_dry_run_reclaim_is_said_a_reclaim_in_the_log() -> None:
    assert action_word("reclaim", "", dry_run=True) == "reclaim (dry run)"
    assert action_word("restart", "signal") == "restart (signal)"
    assert action_word("restart", "recycle", dry_run=True) == "recycle (dry run)"


# ----------------------------------------------------------------- docs/journal.md
def test_the_journal_page_tables_are_made_from_the_records() -> None:
    text = PAGE.read_text()
    assert START in text and END in text
    block = text.partition(START)[2].partition(END)[0]
    assert block == journal_markdown(), "docs/journal.md is stale: run `make readme`"


def test_the_journal_page_names_every_event_and_field_and_no_other() -> None:
    """Read as a person would: a heading per event, a row per field."""
    documented: dict[str, set[str]] = {}
    current = None
    for line in PAGE.read_text().splitlines():
        heading = re.fullmatch(r"### (?:`(\w+)`|Every record)", line)
        if line.startswith("## "):  # another section (causes, states)
            current = None
        elif heading:
            current = heading.group(1) or "*"
            documented[current] = set()
        elif current and (row := re.match(r"\| `(\w+)`", line)):
            documented[current].add(row.group(1))
    common = documented.pop("*")
    assert common == {f.name for f in fields(Record)}
    assert set(documented) == {e.value for e in Event}
    for event, record in RECORDS.items():
        declared = {f.name for f in fields(record)} - common
        assert documented[event.value] == declared, event.value


def test_the_journal_page_names_every_cause_and_state() -> None:
    text = PAGE.read_text()
    for value in [c.value for c in Cause] + [s.value for s in State]:
        assert f"`{value}`" in text, value


# ----------------------------------------------------------------- what the code writes
def _writes() -> list[tuple[str, int, str, list[str]]]:
    """Every journal write in src/ with a literal event: (file, line, event, literal
    keyword names). Journals are written by ``<...>journal.write``, ``_record`` (warden,
    run) and the tracer's ``self.write``."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            receiver, name = ast.unparse(node.func.value), node.func.attr
            journal = name == "write" and (
                receiver.endswith("journal") or (path.name == "trace.py" and receiver == "self")
            )
            if not (journal or name == "_record") or not node.args:
                continue
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                keywords = [k.arg for k in node.keywords if k.arg is not None]
                found.append((str(path.relative_to(SRC)), node.lineno, first.value, keywords))
    return found


def test_every_event_the_code_writes_is_a_record_with_its_fields_declared() -> None:
    writes = _writes()
    assert len(writes) >= 30, writes  # the scan finds them (the warden, run, integrations)
    for where, line, event, keywords in writes:
        assert event in {e.value for e in Event}, f"{where}:{line}: event {event!r}"
        declared = {f.name for f in fields(RECORDS[Event(event)])}
        unknown = set(keywords) - declared
        assert not unknown, f"{where}:{line}: {event} fields {sorted(unknown)} not declared"
    # pause and resume are written under a name chosen at run time
    written = {event for _, _, event, _ in writes} | {"pause", "resume"}
    assert written == {e.value for e in Event}


def test_fields_given_to_job_and_kill_records_by_integrations_are_declared() -> None:
    """``job_started``/``job_finished`` keywords land in the job record; a ``before_kill``
    hook's returned fields (a dict with ``in_flight``) in the kill record."""
    job = {f.name for f in fields(RECORDS[Event.JOB])}
    kill = {f.name for f in fields(RECORDS[Event.KILL])}
    seen = Counter[str]()
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            if call and node.func.attr in ("job_started", "job_finished"):
                names = {k.arg for k in node.keywords if k.arg is not None}
                assert names <= job, f"{path.name}:{node.lineno}: {names - job}"
                seen["job"] += 1
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if "in_flight" in keys and path.parent.name == "integrations":
                    assert keys <= kill, f"{path.name}:{node.lineno}: {keys - kill}"
                    seen["kill"] += 1
                if {"job", "rss_before", "rss_after"} <= keys:  # a job record built whole
                    assert keys <= job, f"{path.name}:{node.lineno}: {keys - job}"
                    seen["job"] += 1
    assert seen["job"] >= 8 and seen["kill"] >= 5, seen


# ----------------------------------------------------------------- real journals conform
WARDENS = """
import time
from memwarden import Hooks, Warden, workload
from memwarden.gauges import Quota
from memwarden.gauges.proc import self_rss

MB = 1 << 20
J = "j.jsonl"


def at(mb):  # a limit this many MiB above where the process is now, in KiB
    return f"{(self_rss() + mb * MB) // 1024}"


def wait(what, timeout=30):
    deadline = time.time() + timeout
    while not what() and time.time() < deadline:
        time.sleep(0.01)


# 1. jobs with live figures and a trace; a fragmented heap over the soft limit: reclaim
w = Warden(soft_limit=at(80), hard_limit=at(2000), measure="tree", grace=3600, min_uptime=0,
           restart="none", journal=J, state_dir=".", trace="fragmenting", trace_runs=1)
with w.job("fragmenting", "j1", queue="default"):
    workload.fragment(mb=200, threads=4, keep_every=20, together=True)
workload.forget()
with w.job("light", 2):
    pass
w.close()

# 1b. live memory over the soft limit (no reclaim helps): intake paused, then resumed once
#     it is let go; the watchdog's samples
calls = []
p = Warden(soft_limit=at(60), hard_limit=at(400), measure="process", grace=3600,
           restart="none", journal=J, state_dir=".",
           hooks=Hooks(pause=lambda: calls.append("pause"),
                       resume=lambda: calls.append("resume")))
p.start()
with p.job("spike", "j1b"):
    buf = bytearray(100 * MB)  # one mmap'd block
    buf[:: 4096] = b"x" * len(buf[:: 4096])
    wait(lambda: "pause" in calls)
    del buf
wait(lambda: "resume" in calls)
p.close()

# 2. a pool child over its share: recycled
child = Warden(quota=Quota(None, "prefork child share", "bare"), measure="process",
               soft_limit=at(30), hard_limit=None, grace=0, min_uptime=0, reclaim=False,
               restart="none", journal=J, state_dir=".",
               hooks=Hooks(recycle=lambda reason: True))
with child.job("keeps", "j3"):
    workload.leak(mb=60)
child.close()
workload.forget()

# 3. over the soft limit with no job in hand: a restart (the way back: none)
r = Warden(measure="process", soft_limit=at(30), hard_limit=at(2000), grace=0, min_uptime=0,
           reclaim=False, restart="none", journal=J, state_dir=".")
workload.leak(mb=60)
r.check()
r.close()
workload.forget()

# 4. the hard limit with a job in hand, in a dry run and for real (the kill hook stands
#    in for SIGKILL)
for dry in (True, False):
    k = Warden(measure="process", soft_limit=None, hard_limit=at(30), restart="none",
               journal=J, state_dir=".", dry_run=dry, hooks=Hooks(kill=lambda: None))
    with k.job("grows", f"j4-{dry}"):
        workload.leak(mb=60)
        k.check()
    k.close()
    workload.forget()
"""


def test_a_journal_the_in_process_warden_wrote_conforms(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WARDENS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    journal = records(tmp_path / "j.jsonl")
    assert nonconforming(journal) == []
    events = {r["event"] for r in journal}
    assert events >= {"job", "sample", "reclaim", "pause", "resume", "restart", "kill", "trace"}
    assert any(r.get("dry_run") for r in journal)
    assert any(r["event"] == "restart" and r["action"] == "recycle" for r in journal)
    assert any(r["event"] == "kill" and r["in_flight"] for r in journal)
    assert any("blocks_before" in r for r in journal if r["event"] == "job")


def test_a_journal_run_wrote_conforms(tmp_path: Path) -> None:
    """``memwarden run``: a command drained at its soft limit, restarted, killed when it
    ignores its stop signal, stopped; its job messages; one that dies young: give up."""
    journal = tmp_path / "j.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    env.pop("DYNO", None)
    env["MEMWARDEN_STATE_DIR"] = str(tmp_path / "state")
    run = [*MEMWARDEN, "run", "--journal", str(journal), "--no-status"]
    grower = [sys.executable, CHILD, "--record", str(tmp_path / "child.jsonl")]
    with open(tmp_path / "run.log", "wb") as log:
        proc = subprocess.Popen(
            [
                *run,
                *["--soft-limit", "60MB", "--measure", "tree", "--drain-signal", "TSTP"],
                *["--min-uptime", "0", "--shutdown-timeout", "1.5", "--"],
                *[*grower, "--grow", "40", "--quiet-on-tstp", "--ignore-term"],
            ],
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        wait_for(
            lambda: sum(r["event"] == "start" for r in records(journal)) >= 2,
            60,
            what="a restart",
        )
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    given_up = subprocess.run(
        [*run, "--min-uptime", "30", "--max-early-exits", "2", "--", *grower, "--exit", "4"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert given_up.returncode == 4, given_up.stderr[-3000:]
    ledger = JobLedger(str(tmp_path / "state"), Journal(str(journal)), poison_kills=1)
    try:
        fd = os.open(ledger.fifo_path, os.O_WRONLY | os.O_NONBLOCK)
        me = os.getpid()
        os.write(fd, f"start {me} j1 send_mail 1000\nstart {me} j2 resize\n".encode())
        ledger.read()
        os.write(fd, f"end {me} j1 2000\n".encode())
        ledger.read()
        ledger.killed(ledger.in_flight())
        os.write(fd, f"skip {me} j2 resize\n".encode())
        ledger.read()
        os.close(fd)
    finally:
        ledger.close()
    written = records(journal)
    assert nonconforming(written) == []
    events = {r["event"] for r in written}
    expected = {"start", "sample", "drain", "restart", "kill", "exit", "give_up"}
    assert events >= expected | {"job", "quarantine", "skip"}, events


@pytest.mark.slow
def test_a_journal_the_demo_wrote_conforms(tmp_path: Path) -> None:
    journal = tmp_path / "demo.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    out = subprocess.run(
        [*MEMWARDEN, "demo", "--journal", str(journal)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    written = records(journal)
    assert nonconforming(written) == []
    assert {r["event"] for r in written} >= {"job", "sample", "reclaim", "restart"}
