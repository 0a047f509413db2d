"""Reclaim on request: a real process with a really fragmented heap, asked through its FIFO."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from memwarden.reclaim import ReclaimRequests, ask_to_reclaim

MB = 1024 * 1024


def test_a_busy_process_asked_to_reclaim_gives_its_free_heap_back(tmp_path: Path) -> None:
    fifo = str(tmp_path / "state" / "reclaim-fifo")
    code = textwrap.dedent(f"""
        import time
        from memwarden import workload
        from memwarden.gauges.proc import self_rss
        from memwarden.reclaim import ReclaimRequests, reclaim

        done = []
        workload.fragment(mb=150, threads=4, keep_every=100, seed=3, together=True)
        ReclaimRequests({fifo!r}, lambda: done.append(reclaim(self_rss))).listen()
        print("ready", self_rss(), flush=True)
        spins, t0 = 0, time.monotonic()
        while not done and time.monotonic() - t0 < 60:  # the main thread never waits
            sum(range(1000))
            spins += 1
        print("freed", done[0].freed if done else -1, "after", spins, flush=True)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    assert proc.stdout is not None
    word, rss = proc.stdout.readline().split()
    assert word == "ready" and int(rss) > 100 * MB  # the stair-step is there
    assert ask_to_reclaim(fifo)
    word, freed, _, spins = proc.stdout.readline().split()
    assert proc.wait(60) == 0
    assert word == "freed" and int(freed) > 50 * MB, freed  # the slivers kept the rest
    assert int(spins) > 0  # it ran beside the busy main thread, not instead of it
    # The process is gone: nothing listens, asking says so (no hang, no error).
    assert os.path.exists(fifo) and not ask_to_reclaim(fifo)


def test_asking_where_nobody_listens_is_false_and_requests_coalesce(tmp_path: Path) -> None:
    assert not ask_to_reclaim(str(tmp_path / "nobody"))
    started, release, runs = threading.Event(), threading.Event(), []

    def slow_reclaim() -> None:
        started.set()
        release.wait(30)
        runs.append(1)

    listener = ReclaimRequests(str(tmp_path / "fifo"), slow_reclaim).listen()
    try:
        assert ask_to_reclaim(listener.path)
        assert started.wait(30)
        assert all(ask_to_reclaim(listener.path) for _ in range(4))  # never blocks the asker
        release.set()
        deadline = time.monotonic() + 30
        while len(runs) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(runs) == 2  # the four asks made while busy: one more run
        peek = os.open(listener.path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            with pytest.raises(BlockingIOError):  # none left waiting to make a third
                os.read(peek, 64)
        finally:
            os.close(peek)
    finally:
        listener.close()
    assert not os.path.exists(listener.path)
