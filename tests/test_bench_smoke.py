"""The benches in a tiny mode: they run end to end and their last lines add up.

Numbers are not judged here (timings belong in ``bench/``); the plumbing is: every contender
asked for prints one ``contender=...`` line whose figures are consistent with the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cgroups import memory_cgroup
from conftest import need_service

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from _harness import KEYS, Result, combine, parse_lines, replace_block, share  # noqa: E402

pytestmark = pytest.mark.slow


def need_cgroups() -> None:
    with memory_cgroup(64 * 1024 * 1024):
        pass


def bench(script: str, *args: str, timeout: float = 240) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = parse_lines(out.stdout)
    tail = out.stdout.strip().splitlines()[-len(rows) :]
    assert all(line.startswith("contender=") for line in tail), "key=value lines must be last"
    for row in rows:
        assert list(row)[: len(KEYS) + 1] == ["contender", *KEYS], row
    return rows


def test_rounds_combine_to_the_median_rate_and_the_sums() -> None:
    def res(rate: float, lost: int, peak: int, **extra: int) -> Result:
        return Result("x", rate, lost, 1, 0.1, peak, 2, extra=extra)

    guard = [res(10, 0, 5, reclaims=1, orphans_max=2), res(30, 1, 9, reclaims=2, orphans_max=1)]
    guard.append(res(20, 0, 7, reclaims=0, orphans_max=0))
    both = combine(guard)
    assert (both.jobs_per_s, both.lost, both.oom_kills, both.peak_bytes) == (20, 1, 3, 9)
    assert both.restarts == 6 and abs(both.over_limit_s - 0.3) < 1e-9
    assert both.extra == {"reclaims": 3, "orphans_max": 2, "rounds": 3}
    base = combine([res(20, 0, 1), res(20, 0, 1), res(40, 0, 1)])
    # Each round against its own base: 50%, 150%, 50% -> 50% (not 20/20 = 100%).
    assert share(both, base) == 0.5


def test_quota_bench_tiny(tmp_path: Path) -> None:
    need_service("Redis", 6379)
    need_cgroups()
    jobs = 16
    rows = bench(
        "quota.py",
        "--jobs",
        str(jobs),
        "--contenders",
        "none,guard-reclaim",
        "--stall",
        "20",
        "--rounds",
        "2",
        "--out",
        str(tmp_path),
    )
    assert [r["contender"] for r in rows] == ["none", "guard-reclaim"]
    limit = 512 * 1024 * 1024
    for r in rows:  # two rounds each, summed (jobs/s: the median)
        assert r["rounds"] == 2 and r["jobs"] == 2 * jobs
        assert 0 <= r["lost"] <= 2 * jobs
        assert r["jobs_per_s"] > 0 and r["lost"] < 2 * jobs  # some jobs were done
        assert r["oom_kills"] >= 0 and r["restarts"] >= 0 and r["duplicates"] >= 0
        assert 0 < r["peak_bytes"] <= limit
        assert r["over_limit_s"] >= 0
        assert r["restarts"] == r["worker_restarts"] + r["recycles"]
    assert rows[0]["reclaims"] == 0 and rows[0]["freed"] == 0  # no guard: nothing reclaimed
    assert rows[0]["guard_kills"] == 0
    assert (tmp_path / "bench-quota.png").stat().st_size > 0
    report = (tmp_path / "bench-quota.md").read_text()
    assert "| guard-reclaim |" in report and "One run of 2 rounds" in report


def test_supervisors_bench_tiny(tmp_path: Path) -> None:
    need_cgroups()
    rows = bench(
        "supervisors.py",
        "--duration",
        "4",
        "--contenders",
        "none,memwarden-run",
        "--out",
        str(tmp_path),
    )
    assert [r["contender"] for r in rows] == ["none", "memwarden-run"]
    for r in rows:
        assert r["jobs_done"] > 0 and r["jobs_per_s"] > 0
        assert r["lost"] >= 0 and r["oom_kills"] >= 0 and r["restarts"] >= 0
        assert r["orphans_left"] >= 0 and r["orphans_max"] >= 0
    # A plain SIGTERM leaves the command's helper child behind: the counter must see it.
    assert rows[0]["orphans_left"] >= 1
    assert (tmp_path / "bench-supervisors.png").stat().st_size > 0


def test_replace_block(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("a\n<!-- bench:x -->\nold\n<!-- /bench:x -->\nb\n")
    assert replace_block(str(doc), "x", "new table")
    assert doc.read_text() == "a\n<!-- bench:x -->\nnew table\n<!-- /bench:x -->\nb\n"
    assert not replace_block(str(doc), "missing", "t")
    assert not replace_block(os.fspath(tmp_path / "nope.md"), "x", "t")
