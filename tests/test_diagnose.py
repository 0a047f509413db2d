"""diagnose: recorded journals of real workloads (labelled) and a synthetic set with noise,
restarts, many pids, transient spikes, malformed lines, few hundred to many thousand jobs."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from memwarden.diagnose import diagnose, load, nnls, sustained, theil_sen
from memwarden.journal import read_records

TRACES = os.path.join(os.path.dirname(__file__), "data", "traces")
with open(os.path.join(TRACES, "labels.json")) as _f:
    LABELS = json.load(_f)
MB = 1024 * 1024


def first(result):
    return result["suspects"][0]["job"] if result["suspects"] else None


# ----------------------------------------------------------------------------- recorded
@pytest.mark.parametrize("name", sorted(LABELS))
def test_recorded_trace(name):
    label = LABELS[name]
    records, bad = load([os.path.join(TRACES, label["file"])])
    result = diagnose(records, bad)
    assert result["pattern"] == label["pattern"], (name, result["evidence"]["shapes"][:2])
    assert first(result) == label["first_suspect"], (name, result["suspects"])
    assert 0.5 <= result["confidence"] <= 1.0
    assert result["advice"]
    if label["pattern"] != "stable":
        assert 0.3 <= result["suspects"][0]["share"] <= 1.0


LIVE = ("blocks", "blocks_before", "heap_in_use", "heap_in_use_before")


@pytest.mark.parametrize("name", sorted(n for n, label in LABELS.items() if label["live_memory"]))
def test_recorded_trace_from_rss_alone(name):
    """The same journals with the live-memory figures taken out: RSS records alone."""
    label = LABELS[name]
    records, bad = load([os.path.join(TRACES, label["file"])])
    for r in records:
        for key in LIVE:
            r.pop(key, None)
    result = diagnose(records, bad)
    assert result["evidence"]["live_memory"] is False
    assert result["pattern"] == label["pattern"], (name, result["evidence"]["shapes"][:2])
    assert first(result) == label["first_suspect"], (name, result["suspects"])


def test_recorded_delayed_leak_really_lands_in_another_job():
    """The point of the delayed_leak traces: per-job RSS deltas blame the wrong kind."""
    records, _ = load([os.path.join(TRACES, LABELS["delayed_leak_rss_only"]["file"])])
    grown = Counter()
    for r in records:
        if r["event"] == "job":
            grown[r["job"]] += max(0, r["rss_after"] - r["rss_before"])
    assert grown.most_common(1)[0][0] == "aggregate"
    assert first(diagnose(records)) == "audit_log"


def test_all_recorded_traces_together_are_read_from_many_files():
    paths = [os.path.join(TRACES, label["file"]) for label in LABELS.values()]
    records, bad = load(paths)
    assert bad == 0
    result = diagnose(records)
    assert result["evidence"]["lifetimes"] >= len(LABELS)


# ----------------------------------------------------------------------------- synthetic
class Worker:
    """A synthetic worker writing journal records like the warden's."""

    def __init__(self, rnd: random.Random, pid: int, t0: float, base: float = 80 * MB):
        self.rnd, self.pid, self.ts = rnd, pid, t0
        self.level = base
        self.out: list[dict] = []

    def job(self, kind: str, after: float, noise: float = 0.0, spike: float = 0.0) -> None:
        before = self.level
        self.level = after
        self.ts += self.rnd.uniform(0.05, 2.0)
        shown = after + self.rnd.gauss(0, noise) + spike
        self.out.append(
            {
                "event": "job",
                "ts": round(self.ts, 6),
                "pid": self.pid,
                "job": kind,
                "job_id": f"{self.pid}-{len(self.out)}",
                "rss_before": int(before),
                "rss_after": int(shown),
                "duration_s": 0.1,
            }
        )


def synthetic(
    pattern: str,
    jobs: int,
    seed: int,
    *,
    culprit: str = "C",
    kinds: tuple[str, ...] = ("A", "B", "C", "D", "E"),
    weights: tuple[int, ...] = (8, 5, 2, 3, 1),
    lifetimes: int = 1,
    noise: float = 0.4 * MB,
    spikes: float = 0.01,
    delayed_into: str | None = None,
    same_pid: bool = False,
    interleave: bool = False,
) -> list[dict]:
    """Records of ``lifetimes`` workers running ``jobs`` jobs in all.

    leak: each run of ``culprit`` keeps 0.3-0.7 MB; with ``delayed_into`` the RSS shows it
    only when that kind runs next (the free-arena effect). bloat: ``culprit`` runs raise a
    high-water mark that levels off (max of random peaks, or a ramp). stable: noise only.
    Spikes: a transient +30..300 MB on a random job, gone by the next one."""
    rnd = random.Random(seed)
    out: list[dict] = []
    per = jobs // lifetimes
    workers = []
    base = rnd.uniform(60, 120) * MB
    for life in range(lifetimes):
        pid = 4 if same_pid else 1000 + life
        t0 = 1_700_000_000 + (0 if interleave else life * per * 3.0)
        if not same_pid:  # another app or host; a restarted container starts where it did
            base = rnd.uniform(60, 120) * MB
        workers.append(Worker(rnd, pid, t0, base=base))
    for w in workers:
        live = 0.0  # bytes kept (leak) or high-water extra (bloat)
        shown = 0.0
        start = w.level
        for i in range(per):
            kind = rnd.choices(kinds, weights)[0]
            if pattern == "leak" and kind == culprit:
                live += rnd.uniform(0.3, 0.7) * MB
            if pattern == "bloat" and kind == culprit:
                if seed % 2:
                    live = max(live, rnd.uniform(0, 60) * MB)  # high-water of random peaks
                else:
                    live = 40 * MB * (1 - 2.718 ** (-i / (per / 8)))  # ramp that levels off
            if delayed_into is None or kind == delayed_into:
                shown = live
            spike = rnd.uniform(30, 300) * MB if rnd.random() < spikes else 0.0
            w.job(kind, start + shown, noise, spike)
        if same_pid and w is not workers[-1]:
            w.out.append(
                {
                    "event": "restart",
                    "ts": w.ts + 0.5,
                    "pid": w.pid,
                    "reason": "300 MiB over soft limit 290 MiB for 2m00s",
                    "action": "signal",
                    "in_flight": [],
                }
            )
        out.extend(w.out)
    if same_pid:  # one pid reused by the next container: the lifetimes follow each other
        ts = 1_700_000_000.0
        for r in out:
            ts += 1.0
            r["ts"] = ts
    return out


def lines_of(records: list[dict]) -> list[str]:
    return [json.dumps(r) for r in records]


CASES = [
    # (pattern, jobs, seed, options)
    ("leak", 300, 1, {}),
    ("leak", 3000, 2, {}),
    ("leak", 12000, 3, {"lifetimes": 6}),
    ("leak", 800, 4, {"delayed_into": "A"}),
    ("leak", 2000, 5, {"delayed_into": "B", "noise": 1.0 * MB, "spikes": 0.03}),
    ("leak", 1500, 6, {"lifetimes": 3, "same_pid": True}),
    ("leak", 2400, 7, {"lifetimes": 4, "interleave": True, "culprit": "E"}),
    ("leak", 60000, 8, {"lifetimes": 3}),
    ("bloat", 300, 11, {}),
    ("bloat", 3000, 12, {}),
    ("bloat", 6000, 13, {"lifetimes": 5, "spikes": 0.03}),
    ("bloat", 1200, 14, {"lifetimes": 3, "same_pid": True, "culprit": "A"}),
    ("bloat", 2000, 15, {"lifetimes": 4, "interleave": True, "culprit": "E"}),
    ("bloat", 40000, 17, {"lifetimes": 2, "spikes": 0.02}),
    ("stable", 300, 21, {}),
    ("stable", 5000, 22, {"spikes": 0.05, "noise": 1.5 * MB}),
    ("stable", 2000, 23, {"lifetimes": 4, "interleave": True}),
]


@pytest.mark.parametrize(("pattern", "jobs", "seed", "options"), CASES)
def test_synthetic(pattern, jobs, seed, options):
    records = synthetic(pattern, jobs, seed, **options)
    result = diagnose(records)
    assert result["pattern"] == pattern, result["evidence"]["shapes"][:3]
    expected = None if pattern == "stable" else options.get("culprit", "C")
    assert first(result) == expected, result["suspects"]
    assert result["confidence"] >= 0.5


def test_delayed_growth_is_not_blamed_on_the_job_that_shows_it():
    records = synthetic("leak", 1500, 31, delayed_into="A", culprit="C")
    naive = Counter()
    for r in records:
        naive[r["job"]] += max(0, r["rss_after"] - r["rss_before"])
    assert naive.most_common(1)[0][0] == "A"  # per-job deltas blame the wrong kind
    result = diagnose(records)
    assert first(result) == "C"
    assert result["suspects"][0]["share"] > 0.6


def test_a_kind_that_merely_runs_often_is_not_blamed():
    # A runs 20x as often as C; C leaks; every job has noisy deltas of both signs
    records = synthetic("leak", 3000, 32, weights=(40, 5, 2, 3, 1))
    result = diagnose(records)
    assert first(result) == "C"
    assert all(s["job"] != "A" or s["share"] < 0.2 for s in result["suspects"])


def test_same_pid_on_two_hosts_is_two_lifetimes():
    one = synthetic("leak", 400, 44)
    other = synthetic("leak", 400, 45)
    for r in one:
        r["host"] = "dyno-a"
    for r in other:
        r["host"], r["pid"] = "dyno-b", one[0]["pid"]
    result = diagnose(one + other)
    assert result["evidence"]["lifetimes"] == 2 and first(result) == "C"


def test_malformed_and_truncated_lines_are_counted_and_skipped():
    lines = lines_of(synthetic("leak", 600, 41))
    lines.insert(10, lines[10][: len(lines[10]) // 2])  # a worker killed mid-write
    lines.insert(50, "not json at all")
    lines.insert(70, "[1, 2, 3]")
    lines.insert(90, json.dumps({"no": "event"}))
    lines.insert(95, json.dumps({"event": "job", "ts": "yesterday", "pid": 1}))
    lines.insert(99, json.dumps({"event": "job", "ts": 1.0, "pid": 1, "job": "X"}))
    lines.append(lines[-1][:-7])
    records, bad = read_records(lines)
    result = diagnose(records, bad)
    assert result["skipped_lines"] == 5
    assert result["skipped_records"] == 2
    assert result["pattern"] == "leak" and first(result) == "C"


def test_empty_and_tiny_journals():
    assert diagnose([])["pattern"] == "stable"
    few = synthetic("leak", 5, 42)
    result = diagnose(few)
    assert result["pattern"] == "stable" and result["suspects"] == []


def test_samples_alone_give_a_pattern():
    rnd = random.Random(5)
    recs = [
        {"event": "sample", "ts": float(i), "pid": 9, "rss": int(100 * MB + i * 0.2 * MB)}
        for i in range(400)
    ]
    recs += [
        {"event": "sample", "ts": float(i), "pid": 10, "rss": int(100 * MB + rnd.gauss(0, MB))}
        for i in range(400)
    ]
    assert diagnose(recs[:400])["pattern"] == "leak"
    assert diagnose(recs[400:])["pattern"] == "stable"
    # three long jobs and the watchdog's samples in between: the samples tell the shape
    jobs = [
        {"event": "job", "ts": t, "pid": 9, "job": "etl", "rss_before": 1, "rss_after": 2}
        for t in (100.5, 200.5, 300.5)
    ]
    result = diagnose(recs[:400] + jobs)
    assert result["pattern"] == "leak" and result["evidence"]["shapes"][0]["jobs"] == 400


def test_live_memory_tells_bloat_from_a_leak_on_the_same_rss():
    """The same RSS ramp: live memory growing with C is a leak, flat live memory bloat."""
    rnd = random.Random(6)
    leak, bloat = [], []
    level, live = 100 * MB, 20 * MB
    for i in range(600):
        kind = rnd.choice("ABC")
        if kind == "C":
            level += 0.5 * MB
            live += 0.5 * MB
        base = {"event": "job", "ts": float(i), "pid": 3, "job": kind, "rss_before": 0}
        leak.append({**base, "rss_after": int(level), "heap_in_use": int(live), "blocks": 1000})
        bloat.append({**base, "rss_after": int(level), "heap_in_use": 20 * MB, "blocks": 1000})
    leak_result, bloat_result = diagnose(leak), diagnose(bloat)
    assert leak_result["pattern"] == "leak" and first(leak_result) == "C"
    assert leak_result["evidence"]["live_memory"] is True
    assert bloat_result["pattern"] == "bloat"


def test_trace_records_show_under_their_suspect_and_reclaims_in_advice():
    records = synthetic("leak", 600, 43)
    records.append(
        {
            "event": "trace",
            "ts": 2e9,
            "pid": 1000,
            "job": "C",
            "runs": 5,
            "top": [{"where": "app/jobs.py:42", "bytes": 2_500_000, "count": 5, "code": "x"}],
        }
    )
    result = diagnose(records)
    assert result["suspects"][0]["trace"][0]["where"] == "app/jobs.py:42"
    bloat = synthetic("bloat", 600, 45)
    bloat.append({"event": "reclaim", "ts": 2e9, "pid": 1000, "freed": 30 * MB, "rss_after": 1})
    advice = " ".join(diagnose(bloat)["advice"])
    assert "30.0 MiB" in advice and "MALLOC_ARENA_MAX=2" in advice and "jemalloc" in advice


# ----------------------------------------------------------------------------- helpers
def test_statistics_helpers():
    assert theil_sen([0, 1, 2, 3, 100, 5, 6]) == pytest.approx(1.0)
    assert sustained([1, 9, 1, 5, 5, 5], 2) == [1, 1, 1, 5, 5, 5]
    rows = [[float(i), float(i % 3)] for i in range(30)]
    beta = nnls(rows, [2.0 * r[0] for r in rows])
    assert beta[0] == pytest.approx(2.0, rel=1e-3) and beta[1] == pytest.approx(0.0, abs=1e-3)


# ----------------------------------------------------------------------------- command
def test_command_json_and_human_output(tmp_path):
    journal = tmp_path / "j.jsonl"
    lines = lines_of(synthetic("leak", 400, 51))
    journal.write_text("\n".join(lines[:200]) + "\n" + lines[200][:30] + "\n")
    gz = tmp_path / "j2.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("\n".join(lines[201:]) + "\n")
    cmd = [sys.executable, "-m", "memwarden.cli", "diagnose"]
    out = subprocess.run([*cmd, str(journal), str(gz), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["pattern"] == "leak" and result["skipped_lines"] == 1
    assert {"job", "growth_bytes", "share"} <= set(result["suspects"][0])
    human = subprocess.run(
        [*cmd, "-"], input=journal.read_text(), capture_output=True, text=True, check=True
    )
    assert human.stdout.startswith("Verdict: LEAK") and "Advice:" in human.stdout
    missing = subprocess.run([*cmd, str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode != 0 and "nope" in missing.stderr
