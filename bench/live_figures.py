"""What the live-memory figures and tracing cost, measured side by side in one run.

    .venv/bin/python bench/live_figures.py

- ``blocks`` (``sys.getallocatedblocks()``) and ``heap_in_use`` (glibc ``mallinfo2()``),
  read twice per job when ``MEMWARDEN_LIVE_MEMORY`` is on (the default): each read alone,
  on a small heap and on a big one (1M live Python objects + a fragmented 64 MiB of
  multi-threaded malloc), next to the own-RSS read the job hook always does.
- The whole job hook pair (``job_started`` + ``job_finished``, journal off) with the
  figures off, on, and on within their budget (off once a read costs over 1% of the mean
  job time and 20 µs: these bench jobs take no time, so the budget turns them off).
- ``MEMWARDEN_TRACE``: an allocation-heavy job with and without tracemalloc running.
"""

from __future__ import annotations

import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable

from memwarden import Journal, Warden, workload
from memwarden.gauges.proc import self_rss
from memwarden.trace import _mallinfo2


def per_call_us(fn: Callable[[], object], n: int) -> float:
    """Median of 5 rounds of n calls, microseconds per call."""
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(rounds)


def reads(label: str) -> list[tuple[str, float]]:
    mallinfo = _mallinfo2()
    rows = [
        (f"{label}: own RSS (statm)", per_call_us(self_rss, 20000)),
        (f"{label}: sys.getallocatedblocks()", per_call_us(sys.getallocatedblocks, 2000)),
    ]
    if mallinfo is not None:
        rows.append((f"{label}: mallinfo2()", per_call_us(mallinfo, 2000)))
    return rows


def hook_pairs_us() -> tuple[float, float, float]:
    """Job hook pair cost with live figures off, on, and on within the budget; the three
    wardens take turns (7 rounds, median) so machine load hits them alike."""
    wardens = []
    for live, budget in ((False, True), (True, False), (True, True)):
        w = Warden(soft_limit="100GB", measure="process", journal=Journal(None), live_memory=live)
        if not budget:
            w.live.job_done = lambda duration_s: None  # type: ignore[method-assign]
        wardens.append(w)
    times: list[list[float]] = [[], [], []]
    for _ in range(7):
        for i, w in enumerate(wardens):
            t0 = time.perf_counter()
            for _ in range(2000):
                w.job_started("bench", 1)
                w.job_finished(1)
            times[i].append((time.perf_counter() - t0) / 2000 * 1e6)
    off, on, budgeted = (statistics.median(t) for t in times)
    return off, on, budgeted


def allocation_job() -> None:
    data = [{"id": i, "name": str(i) * 3} for i in range(20000)]
    del data


def main() -> None:
    rows = reads("small heap")
    small_hooks = hook_pairs_us()
    keep = [[i] for i in range(1_000_000)]  # 1M live objects in pymalloc
    workload.fragment(64, threads=4, keep_every=20)
    rows += reads("big heap")
    big_hooks = hook_pairs_us()
    plain = per_call_us(allocation_job, 20)
    tracemalloc.start(1)
    traced = per_call_us(allocation_job, 20)
    tracemalloc.stop()
    del keep
    workload.forget()

    print(f"{'measure':<42} {'µs':>9}")
    for name, us in rows:
        print(f"{name:<42} {us:>9.2f}")
    for label, (off, on, budgeted) in (("small heap", small_hooks), ("big heap", big_hooks)):
        print(f"{label + ': job hooks, live figures off':<42} {off:>9.2f}")
        print(f"{label + ': job hooks, live figures on':<42} {on:>9.2f}  (+{on - off:.2f} µs/job)")
        print(
            f"{label + ': job hooks, on, 1% budget':<42} {budgeted:>9.2f}"
            f"  (+{budgeted - off:.2f} µs/job for these ~0 s jobs)"
        )
    print(f"{'allocation-heavy job, plain':<42} {plain:>9.0f}")
    print(f"{'allocation-heavy job, tracemalloc on':<42} {traced:>9.0f}  ({traced / plain:.1f}x)")
    print(
        f"live_figures_us_per_job_small={small_hooks[1] - small_hooks[0]:.2f} "
        f"live_figures_us_per_job_big={big_hooks[1] - big_hooks[0]:.2f} "
        f"budgeted_us_per_job_big={big_hooks[2] - big_hooks[0]:.2f} "
        f"tracemalloc_slowdown={traced / plain:.1f}"
    )


if __name__ == "__main__":
    main()
