"""The field bench (``bench/field.py``): its counting on made-up journals, and its tiny mode
end to end — real workers in real memory cgroups, lines that parse, no job lost and no OOM
kill in the tiny cells. Figures and timings are the bench's business, not asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cgroups import memory_cgroup
from conftest import need_service

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import field  # noqa: E402

MB = 1024 * 1024
#: The keys every cell line starts with, in this order (the issue's contract).
HEAD = ["cell", "jobs", "lost", "dup", "oom_kills", "graceful", "kills", "poison_ok", "verdict"]


def rec(event: str, pid: int, ts: float, **fields: Any) -> dict[str, Any]:
    return {"event": event, "pid": pid, "ts": ts, **fields}


def figures(records: list[dict[str, Any]], lifetimes: list[field.Lifetime]) -> field.Figures:
    fig = field.Figures("x/y")
    field.graceful_and_hard(fig, records, lifetimes)
    return fig


def test_a_restart_that_ends_in_a_clean_exit_is_graceful() -> None:
    fig = figures(
        [rec("restart", 10, 1.0, action="signal")],
        [field.Lifetime(10, 0.0, 2.0, 0), field.Lifetime(11, 2.0)],
    )
    assert (fig.graceful, fig.kills, fig.cut, fig.restarts) == (1, 0, 0, 1)
    assert fig.graceful_pct == 100


def test_a_restart_cut_by_a_kill_is_one_hard_remedy() -> None:
    records = [
        rec("restart", 10, 1.0, action="signal"),
        rec("kill", 10, 3.0, in_flight=[{"job_id": "a"}]),
        rec("restart", 11, 5.0, action="signal"),  # another process, its own end
    ]
    fig = figures(records, [field.Lifetime(10, 0, 3.1, -9), field.Lifetime(11, 3.1, 6, 0)])
    assert (fig.graceful, fig.kills, fig.cut, fig.restarts) == (1, 1, 0, 2)
    assert fig.graceful_pct == 50


def test_a_restart_ended_by_a_sigkill_from_elsewhere_is_cut() -> None:
    """No memwarden kill, but the process died of SIGKILL (the kernel): not graceful."""
    fig = figures([rec("restart", 10, 1.0, action="exit")], [field.Lifetime(10, 0, 2, -9)])
    assert (fig.graceful, fig.kills, fig.cut) == (0, 0, 1)


def test_a_drain_that_ends_in_a_crash_is_cut() -> None:
    """Sidekiq 6.4 given TSTP and TERM a millisecond apart crashed (status 1) and lost the
    jobs in hand: no clean exit, no graceful restart."""
    records = [
        rec("restart", 20, 1.0, action="signal", supervisor=5),
        rec("exit", 20, 1.1, supervisor=5, status=1),
        rec("restart", 21, 4.0, action="signal", supervisor=5),
        rec("exit", 21, 5.0, supervisor=5, status=143),  # its stop signal's default action
        rec("restart", 22, 6.0, action="exit", supervisor=5),
        rec("exit", 22, 7.0, supervisor=5, status=75),
    ]
    fig = figures(records, [field.Lifetime(5, 0.0)])
    assert (fig.graceful, fig.cut) == (2, 1)


def test_memwarden_run_exit_records_judge_its_restarts() -> None:
    """Under ``memwarden run`` the bench starts ``run``; CMD's end is in run's journal."""
    records = [
        rec("restart", 20, 1.0, action="signal", supervisor=5),
        rec("exit", 20, 1.5, supervisor=5, status=0),
        rec("restart", 21, 4.0, action="signal", supervisor=5),
        rec("exit", 21, 9.0, supervisor=5, status=137),
    ]
    fig = figures(records, [field.Lifetime(5, 0.0)])
    assert (fig.graceful, fig.cut) == (1, 1)


def test_a_recycled_pool_child_is_graceful_and_no_whole_worker_restart() -> None:
    records = [rec("restart", 30, 1.0, action="recycle"), rec("restart", 31, 2, action="leave")]
    fig = figures(records, [])
    assert (fig.graceful, fig.recycles, fig.restarts) == (2, 2, 0)


def test_cell_lines_parse() -> None:
    text = (
        "# a comment\ncell=a/b jobs=3 lost=0 why=-\n| a table |\ncell=c/d jobs=4 lost=1 why=oom\n"
    )
    rows = field.parse(text)
    assert rows == [
        {"cell": "a/b", "jobs": 3, "lost": 0, "why": "-"},
        {"cell": "c/d", "jobs": 4, "lost": 1, "why": "oom"},
    ]


def jobs(*ids: str) -> list[field.Job]:
    return [field.Job(i, "light") for i in ids]


def test_count_lost_duplicates_poison_and_innocents() -> None:
    batch = jobs("t-1", "t-2", "t-3", "t-poison")
    records = [
        rec("kill", 1, 1.0, in_flight=[{"job_id": "t-poison"}, {"job_id": "t-2"}]),
        rec("kill", 1, 2.0, in_flight=[{"job_id": "t-poison"}]),
        rec("quarantine", 2, 3.0, job_id="t-poison"),
        rec("reclaim", 2, 3.5),
        rec("pause", 2, 3.6),
    ]
    fig = field.Figures("x/poison")
    done = {"t-1": 2, "t-2": 1}
    field.count(fig, batch, "t-poison", done, records, {"t-3"}, [])
    assert (fig.jobs, fig.lost, fig.dup) == (4, 1, 1)  # t-3 never done; t-1 twice
    assert fig.innocents == 2  # t-2 in a kill's in_flight, t-3 counted in Redis
    assert (fig.poison_kills, fig.poison_ok) == (2, "yes")
    assert (fig.kills, fig.reclaims, fig.pauses) == (2, 1, 1)
    fig.judge(poison_cell=True, runaway=False)
    assert fig.verdict == "red" and fig.why == ["lost", "innocent"]


def test_poison_not_quarantined_or_after_too_many_kills_is_not_ok() -> None:
    kill = rec("kill", 1, 1.0, in_flight=[{"job_id": "p"}])
    for records, lost in (([kill], 1), ([kill] * 4 + [rec("poison", 1, 9.0, job_id="p")], 0)):
        fig = field.Figures("x/poison")
        field.count(fig, jobs("p", "a"), "p", {"a": 1}, records, set(), [])
        assert fig.poison_ok == "no"
        assert fig.lost == lost  # neither done nor quarantined: the poison job vanished
        fig.judge(poison_cell=True, runaway=False)
        assert "poison" in fig.why


def test_verdict_goals() -> None:
    fig = field.Figures("x/fast-leak", graceful=9, kills=1)
    fig.judge(poison_cell=False, runaway=False)
    assert fig.verdict == "green"  # 90% graceful is the goal
    fig = field.Figures("x/fast-leak", graceful=8, kills=1, cut=1, oom_kills=1)
    fig.judge(poison_cell=False, runaway=False)
    assert fig.why == ["oom", "graceful"]
    fig = field.Figures("x/poison", graceful=0, kills=3, poison_ok="yes")
    fig.judge(poison_cell=True, runaway=False)
    assert fig.verdict == "green"  # a poison job ends in kills: no graceful goal there
    fig = field.Figures("run/runaway", tries=3, kernel_wins=1, memwarden_wins=2, kills=2)
    fig.judge(poison_cell=False, runaway=True)
    assert fig.why == ["kernel"]  # killed, not drained: a runaway job never ends by itself
    assert field.Figures("x/spike").graceful_pct is None  # no remedy: nothing to judge
    fig = field.Figures("x/y", dup=2)
    fig.judge(poison_cell=False, runaway=False)
    assert fig.verdict == "green"  # at least once: duplicates counted, not judged
    fig.judge(poison_cell=False, runaway=False, exactly_once=True)
    assert fig.why == ["dup"]


def test_the_wardens_own_failures_are_counted_and_make_a_cell_red(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    log.write_text(
        "[.. ERROR/ForkPoolWorker-2] memwarden: internal error in _on_process_init (job ok)\n"
        "Traceback (most recent call last):\n"
        "memwarden: RQ job f [x] quarantined in the failed registry after 3 hard kills\n"
        "memwarden: the pause hook failed\n"
        "memwarden: restart (signal): 300 MiB over soft limit; in flight: none\n"
    )
    assert field.warden_errors(str(log)) == 2
    assert field.warden_errors(str(tmp_path / "none.log")) == 0
    fig = field.Figures("x/y", warden_errors=2)
    fig.judge(poison_cell=False, runaway=False)
    assert fig.why == ["warden-error"]


def test_the_matrix_says_ok_or_the_failures_and_the_remedies() -> None:
    ok = field.Figures("run/fast-leak", graceful=2)
    bad = field.Figures("run/poison", lost=1, kills=5, poison_ok="no")
    bad.judge(poison_cell=True, runaway=False)
    quiet = field.Figures("rq-worker/fast-leak")
    table = field.matrix([ok, bad, quiet], {"sidekiq-run": "not installed"})
    assert "| run | ok · 2 graceful | **1 lost, poison not quarantined** · 5 killed |" in table
    assert "| rq-worker | ok · none needed |  |" in table  # no poison cell run
    assert "| sidekiq-run | not run | not run |" in table


def test_rounds_combine_to_sums_and_the_worst_verdict() -> None:
    a = field.Figures("x/y", jobs=10, lost=0, graceful=2, peak=5 * MB, jobs_per_s=4.0)
    b = field.Figures("x/y", jobs=10, lost=1, kills=1, peak=9 * MB, jobs_per_s=2.0, why=["lost"])
    c = field.Figures("x/y", jobs=10, lost=0, graceful=1, peak=7 * MB, jobs_per_s=3.0)
    both = field.combine([a, b, c])
    assert (both.jobs, both.lost, both.graceful, both.kills, both.rounds) == (30, 1, 3, 1, 3)
    assert both.peak == 9 * MB and both.jobs_per_s == 3.0
    assert both.verdict == "red" and both.why == ["lost"]


def test_cells_are_chosen_by_pattern() -> None:
    import argparse

    p = argparse.ArgumentParser()
    assert field.choose_cells(p, "celery-*/spike", False) == [
        "celery-prefork/spike",
        "celery-threads/spike",
        "celery-solo/spike",
    ]
    run = field.choose_cells(p, "run/*", False)
    assert "run/runaway" in run and "run/poison" in run
    assert field.choose_cells(p, "arq/*", False) == [f"arq/{w}" for w in field.MATRIX_WORKLOADS]
    assert field.choose_cells(p, "*/runaway", False)[0] == "run/runaway"
    assert field.choose_cells(p, None, True) == list(field.TINY_CELLS)
    matrix = field.choose_cells(p, None, False)
    assert len(matrix) == len(field.FRAMEWORKS) * len(field.MATRIX_WORKLOADS) + 1
    with pytest.raises(SystemExit):
        field.choose_cells(p, "nope/*", False)


def test_plans_hold_what_their_workload_says() -> None:
    fw = field.FRAMEWORKS["celery-threads"]
    limit, idle = 400 * MB, 60 * MB
    s = field.Settings()
    for name in field.MATRIX_WORKLOADS:
        batch = field.plan(field.WORKLOADS[name], fw, s, idle, limit, "tok")
        assert len({j.id for j in batch}) == len(batch) and all(
            j.id.startswith("tok-") for j in batch
        )
        kinds = {j.kind for j in batch}
        if name == "poison":
            assert sum(j.kind == "poison" for j in batch) == 1 and kinds == {"light", "poison"}
        if name == "spike":
            spikes = [j for j in batch if j.kind == "spike"]
            assert len(spikes) == 2 and all(idle + j.mb * MB >= 0.85 * limit for j in spikes)
        if name in ("fast-leak", "big-leak"):
            kept = sum(j.mb for j in batch) * MB
            assert kept > 1.2 * (0.85 * limit - idle)  # enough to need a remedy


def need_cgroups() -> None:
    with memory_cgroup(64 * MB):
        pass


@pytest.mark.slow
def test_tiny_field_bench(tmp_path: Path) -> None:
    need_service("Redis", 6379)
    need_cgroups()
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- bench:field-headline -->\nold\n<!-- /bench:field-headline -->\nb\n")
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "field.py"), "--tiny", "--out", str(tmp_path),
         "--readme", str(readme)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    rows = field.parse(out.stdout)
    tail = out.stdout.strip().splitlines()[-len(rows) :]
    assert all(line.startswith("cell=") for line in tail), "the cell lines must be last"
    assert [r["cell"] for r in rows] == list(field.TINY_CELLS)
    for r in rows:
        assert list(r)[: len(HEAD)] == HEAD, r
        assert r["jobs"] > 0 and r["verdict"] in ("green", "red"), r
        assert not str(r["why"]).startswith("broken"), r
        assert r["graceful"] >= 0 and r["kills"] >= 0 and r["dup"] >= 0, r
        assert 0 < r["peak_mib"] <= r["limit_mib"], r
        # The goals the tiny cells hold today: no job lost, no kernel OOM kill.
        assert r["lost"] == 0, r
        if r["cell"].endswith("/runaway"):
            assert r["tries"] == 2 and r["memwarden_wins"] + r["kernel_wins"] <= 2, r
        else:
            assert r["oom_kills"] == 0, r
    doc = (tmp_path / "field.md").read_text()
    assert "| cell |" in doc and all(f"| {c} |" in doc for c in field.TINY_CELLS)
    headline = readme.read_text()
    assert "old" not in headline and "| worker |" in headline and headline.endswith("b\n")
