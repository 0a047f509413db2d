"""``memwarden demo``: a real worker, a real supervisor, figures checked from the journal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memwarden.cli.demo import FileQueue, bar, summarize, summary_text
from memwarden.units import format_size

MEMWARDEN = [sys.executable, "-c", "from memwarden.cli import main; main()"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"memwarden.cli.demo" in f.read()
    except OSError:
        return False


@pytest.mark.slow
def test_demo_reclaims_and_restarts_then_summarises_in_under_a_minute(tmp_path: Path) -> None:
    journal = tmp_path / "demo.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    start = time.monotonic()
    out = subprocess.run(
        [*MEMWARDEN, "demo", "--journal", str(journal)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert elapsed < 60, f"the demo took {elapsed:.1f}s"
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    got = summarize(records)
    assert got.reclaims >= 1 and got.freed > 0
    assert got.restarts >= 1 and got.lifetimes >= 2
    assert got.each_once  # drained restarts lose no job and run none twice
    if got.jobs < 90:  # a very busy machine: the 45 s budget ended the demo; it says so
        assert f", {90 - got.jobs} left when the time budget ran out" in out.stdout
    assert got.kills == 0
    assert got.peak >= got.soft  # the limit was really hit
    # The printed summary is the journal's.
    text = out.stdout
    assert f"reclaims      {got.reclaims}, freed {format_size(got.freed)}" in text
    assert f"restarts      {got.restarts} " in text
    assert f"jobs done     {got.jobs} in {got.lifetimes} worker lifetimes" in text
    assert f"next: memwarden diagnose {journal}" in text
    assert "OVER" in text  # memory against the limit, shown as it went
    assert [p for p in {r["pid"] for r in records if r["event"] == "job"} if alive(p)] == []


def test_summary_from_records() -> None:
    records = [
        {"event": "job", "pid": 1, "job_id": 0, "rss_after": 50},
        {"event": "sample", "pid": 1, "total": 120, "limit": 100, "hard": 200},
        {"event": "reclaim", "pid": 1, "freed": 30},
        {"event": "reclaim", "pid": 1, "freed": 99, "dry_run": True},
        {"event": "restart", "pid": 1, "reason": "x"},
        {"event": "job", "pid": 2, "job_id": 1, "rss_after": 40},
        {"event": "surprise", "pid": 2},
    ]
    s = summarize(records)
    assert (s.jobs, s.lifetimes, s.reclaims, s.freed, s.restarts, s.kills) == (2, 2, 1, 30, 1, 0)
    assert (s.peak, s.soft, s.hard, s.each_once) == (120, 100, 200, True)
    text = summary_text(s, "j.jsonl", 12.0, 0)
    assert "every job ran exactly once" in text and text.endswith("memwarden diagnose j.jsonl")
    twice = summarize([*records, {"event": "job", "pid": 3, "job_id": 1, "rss_after": 1}])
    assert not twice.each_once and "SOME JOBS RAN TWICE" in summary_text(twice, "j", 1.0, 0)


def test_file_queue_goes_on_where_the_last_worker_stopped(tmp_path: Path) -> None:
    q = FileQueue(str(tmp_path / "queue"), 2)
    assert q.next() == 0
    q.ack(0)
    assert FileQueue(str(tmp_path / "queue"), 2).next() == 1
    q.ack(1)
    assert q.next() is None
    assert bar(50, 100, 10) == "[#####.....]" and bar(150, 100, 4) == "[####] OVER"
