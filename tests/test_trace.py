"""Tracing (MEMWARDEN_TRACE) and live-memory figures, in real worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc

import pytest

from memwarden.analysis.diagnose import diagnose, load
from memwarden.trace import Claim, LiveFigures, live_figures

WORKER = """
import random, sys
from memwarden import Warden

KEPT = []


def invoice(rnd):
    KEPT.append([str(rnd.random()) * 20 for _ in range(2000)])  # LEAK HERE


def email(rnd):
    tmp = [str(rnd.random()) for _ in range(3000)]
    del tmp


w = Warden(soft_limit="100GB", measure="process", state_dir=sys.argv[1], journal=sys.argv[2])
rnd = random.Random(int(sys.argv[3]))
for i in range(int(sys.argv[4])):
    kind = rnd.choice(["invoice", "email", "email"])
    with w.job(kind, i):
        globals()[kind](rnd)
"""


def run_worker(tmp_path, env_extra, jobs=60, seed=1, name="worker.py"):
    script = tmp_path / name
    script.write_text(WORKER)
    journal = tmp_path / f"{name}.jsonl"
    env = {**os.environ, **env_extra}
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "state"), str(journal), str(seed), str(jobs)],
        env=env,
        check=True,
        timeout=120,
        cwd=tmp_path,
    )
    with open(journal) as f:
        return [json.loads(line) for line in f], str(journal)


def leak_line() -> int:
    return next(i for i, line in enumerate(WORKER.splitlines(), 1) if "LEAK HERE" in line)


def test_trace_names_the_leaking_line_and_diagnose_shows_it(tmp_path):
    records, journal = run_worker(
        tmp_path, {"MEMWARDEN_TRACE": "invoice", "MEMWARDEN_TRACE_RUNS": "3"}, jobs=400
    )
    traces = [r for r in records if r["event"] == "trace"]
    assert len(traces) == 1
    trace = traces[0]
    assert trace["job"] == "invoice" and trace["runs"] == 3
    top = trace["top"][0]
    assert top["where"] == f"worker.py:{leak_line()}"
    assert "LEAK HERE" in top["code"]
    assert top["bytes"] > 3 * 2000 * 50  # 3 runs x 2000 strings of ~ 60+ bytes
    # no tracing before or after those runs: tracemalloc was stopped
    assert not tracemalloc.is_tracing()
    result = diagnose(*load([journal]))
    assert result["pattern"] == "leak"
    suspect = result["suspects"][0]
    assert suspect["job"] == "invoice"
    assert suspect["trace"][0]["where"] == top["where"]


@pytest.mark.parametrize("live", ["true", "false"])
def test_trace_auto_picks_the_kind_to_blame(tmp_path, live):
    env = {"MEMWARDEN_TRACE": "auto", "MEMWARDEN_LIVE_MEMORY": live}
    records, _ = run_worker(tmp_path, env, jobs=320)
    traces = [r for r in records if r["event"] == "trace"]
    assert [t["job"] for t in traces] == ["invoice"]
    assert traces[0]["top"][0]["where"] == f"worker.py:{leak_line()}"
    first_traced = next(r["ts"] for r in traces)
    jobs_before = sum(1 for r in records if r["event"] == "job" and r["ts"] < first_traced)
    assert jobs_before >= 200  # it decided from this process's own records first


def test_one_worker_per_host_traces_a_kind(tmp_path):
    env = {"MEMWARDEN_TRACE": "invoice", "MEMWARDEN_TRACE_RUNS": "2"}
    first, _ = run_worker(tmp_path, env, jobs=40, name="a.py")
    second, _ = run_worker(tmp_path, env, jobs=40, seed=2, name="b.py")
    assert sum(r["event"] == "trace" for r in first) == 1
    assert sum(r["event"] == "trace" for r in second) == 0


def test_claim_of_a_dead_tracer_is_taken_over(tmp_path):
    claim = Claim(str(tmp_path), "invoice")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    with open(claim.path, "w") as f:
        f.write(dead.stdout.strip())
    assert claim.take()
    claim.done()
    assert not Claim(str(tmp_path), "invoice").take()


def test_job_records_carry_live_memory_unless_turned_off(tmp_path):
    records, _ = run_worker(tmp_path, {}, jobs=10)
    jobs = [r for r in records if r["event"] == "job"]
    fields = {"blocks", "blocks_before"}
    if "heap_in_use" in live_figures():
        fields |= {"heap_in_use", "heap_in_use_before", "mmapped", "mmapped_before"}
    assert all(fields <= set(j) for j in jobs)
    leaky = [j for j in jobs if j["job"] == "invoice"]
    assert all(j["blocks"] - j["blocks_before"] >= 2000 for j in leaky)
    off, _ = run_worker(tmp_path, {"MEMWARDEN_LIVE_MEMORY": "false"}, jobs=10, name="off.py")
    assert not any("blocks" in r for r in off)


def test_live_figures_turn_off_when_dear_for_the_job_time():
    slow_jobs = LiveFigures(True)
    slow_jobs.costs.extend([1e-3] * 8)  # a read costs 1 ms (a huge heap)
    for _ in range(20):
        slow_jobs.job_done(1.0)  # 1 s jobs: 1 ms is 0.1% of a job
    assert slow_jobs.enabled and slow_jobs.read()
    fast_jobs = LiveFigures(True)
    fast_jobs.read()
    fast_jobs.costs.extend([1e-3] * 8)
    for _ in range(20):
        fast_jobs.job_done(0.01)  # 10 ms jobs: 1 ms is 10%
    assert not fast_jobs.enabled and fast_jobs.read() == {}


# ----------------------------------------------------------------------------- big buffers
MiB = 1024 * 1024
KEEP_BIG = """
import json, sys
from memwarden.trace import live_bytes, live_figures

before = live_figures()
kept = [b"\\x01" * (5 * 1024 * 1024) for _ in range(10)]  # 10 x 5 MiB: glibc serves by mmap
after = live_figures()
grew = live_bytes(after) - live_bytes(before)
print(json.dumps({"before": before, "after": after, "grew": grew}))
"""


def test_live_figures_see_buffers_served_by_mmap():
    """Keeping 10 x 5 MiB (each over glibc's mmap threshold) moves live memory by 50 MiB."""
    out = subprocess.run(
        [sys.executable, "-c", KEEP_BIG], capture_output=True, text=True, check=True, timeout=60
    )
    figures = json.loads(out.stdout)
    assert "mmapped" in figures["after"], figures
    assert 49 * MiB <= figures["grew"] <= 60 * MiB, figures


JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


@pytest.mark.skipif(not os.path.exists(JEMALLOC), reason="libjemalloc.so.2 is not installed")
def test_live_figures_under_jemalloc_read_its_stats():
    env = {**os.environ, "LD_PRELOAD": JEMALLOC}
    out = subprocess.run(
        [sys.executable, "-c", KEEP_BIG],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    figures = json.loads(out.stdout)
    assert "allocated" in figures["after"] and "heap_in_use" not in figures["after"], figures
    assert 49 * MiB <= figures["grew"] <= 60 * MiB, figures
