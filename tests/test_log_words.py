"""The warden's log lines say what was done in the journal's words, with figures that add
up (issue 14, item 8): real wardens in a real process, real memory."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

MiB = 1024 * 1024

SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from memwarden import Hooks, Warden, workload
    from memwarden.gauges import Quota
    from memwarden.gauges.proc import self_rss

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    state = sys.argv[1]
    base = self_rss()

    def kib(n):
        return f"{n // 1024}"

    # 1. reclaim: a fragmented heap over the soft limit, measured by the tree's PSS
    w = Warden(soft_limit=kib(base + 80 * 2**20), hard_limit=kib(base + 2000 * 2**20),
               measure="tree", grace=3600, min_uptime=0, restart="none", state_dir=state)
    with w.job("fragmenting", "j1"):
        workload.fragment(mb=200, threads=4, keep_every=20, together=True)
    w.close()
    workload.forget()

    # 2. recycle: a pool child's warden, whose soft limit is its share of the worker
    base = self_rss()
    child = Warden(quota=Quota(None, "prefork child share", "bare"), measure="process",
                   soft_limit=kib(base + 30 * 2**20), hard_limit=None, grace=0,
                   min_uptime=0, reclaim=False, restart="none", state_dir=state,
                   hooks=Hooks(recycle=lambda reason: True))
    with child.job("keeps", "j2"):
        workload.leak(mb=60)
    child.close()
    workload.forget()

    # 3. kill at the hard limit (the kill hook stands in for SIGKILL)
    base = self_rss()
    k = Warden(measure="process", soft_limit=None, hard_limit=kib(base + 30 * 2**20),
               restart="none", state_dir=state, hooks=Hooks(kill=lambda: None))
    with k.job("grows", "j3"):
        workload.leak(mb=60)
    k.close()
    """
)


def run(tmp_path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def mib(text: str) -> float:
    return float(text.replace(",", ""))


def test_log_lines_say_what_was_done_with_figures_that_add_up(tmp_path):
    log = run(tmp_path)
    reclaim = re.search(
        r"reclaimed ([\d.,]+) MiB of this process's RSS \(([\d.,]+) MiB -> ([\d.,]+) MiB\); "
        r"tree figure ([\d.,]+) MiB -> ([\d.,]+) MiB",
        log,
    )
    assert reclaim, log
    freed, before, after = (mib(reclaim[i]) for i in (1, 2, 3))
    assert abs((before - after) - freed) <= 0.11, log  # each figure rounded to 0.1 MiB
    recycle = [line for line in log.splitlines() if "over soft limit" in line]
    assert recycle and recycle[0].startswith("memwarden: recycle: "), log
    assert "this pool child's share" in recycle[0]
    kill = [line for line in log.splitlines() if "over hard limit" in line]
    assert kill and kill[0].startswith("memwarden: kill: "), log
    assert "kill (kill)" not in log and "restart (recycle)" not in log
