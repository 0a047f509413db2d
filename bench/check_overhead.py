"""Microseconds per after-job memory check: memwarden vs a `ps` shell-out, psutil and
getrusage, measured side by side in one run.

A memwarden check is what ``Warden.job_finished`` does after a job besides the journal write:
read own RSS (``pread`` on a kept ``/proc/self/statm`` fd) and let the policy decide. A
``ps``-after-each-job middleware shells out to ``ps -o rss=`` after every job; psutil's
``memory_info()`` opens and parses ``/proc/<pid>/statm`` each time; ``getrusage`` is cheap
but gives the *peak* (``ru_maxrss``), so it is shown for scale only — it cannot tell whether
memory came back down.

Second table: one watchdog reading of the cgroup working set (where this process has a memory
cgroup): the kept-fd ``working_set()`` the watchdog uses, beside a full ``read()`` (four files
opened and parsed: usage, stat, OOM counter, limit) and the tree PSS gauge.

    python bench/check_overhead.py            # last line: check_us=… ps_us=… psutil_us=… ratio_ps=…
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable

import psutil

from memwarden import Warden
from memwarden.gauges.cgroup import Cgroup
from memwarden.gauges.proc import self_rss, tree_pss


def per_call_us(fn: Callable[[], object], n: int, repeat: int = 5) -> float:
    """Best of ``repeat`` runs of ``n`` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200_000, help="calls per timing run")
    parser.add_argument("--ps-n", type=int, default=200, help="ps shell-outs per timing run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as state:
        warden = Warden(
            env={},
            soft_limit="100GB",
            measure="process",
            restart="none",
            state_dir=state,
        )
        pid = str(os.getpid())
        proc = psutil.Process()

        def memwarden_check() -> object:
            return warden._check(fast_rss=self_rss())

        def ps() -> object:
            return int(subprocess.run(["ps", "-o", "rss=", "-p", pid], capture_output=True).stdout)

        def psutil_rss() -> object:
            return proc.memory_info().rss

        def rusage() -> object:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        check_us = per_call_us(memwarden_check, args.n)
        read_us = per_call_us(self_rss, args.n)
        psutil_us = per_call_us(psutil_rss, args.n // 10)
        rusage_us = per_call_us(rusage, args.n)
        ps_us = per_call_us(ps, args.ps_n, repeat=3)

    print(f"{'method':<34} {'µs/check':>10} {'vs memwarden':>13}")
    for name, us in [
        ("memwarden check (read + policy)", check_us),
        ("  of which statm pread", read_us),
        ("psutil memory_info()", psutil_us),
        ("getrusage (peak only!)", rusage_us),
        ("ps -o rss= (shelling out)", ps_us),
    ]:
        print(f"{name:<34} {us:>10.2f} {us / check_us:>12.1f}x")
    last = (
        f"check_us={check_us:.3f} ps_us={ps_us:.1f} psutil_us={psutil_us:.3f} "
        f"ratio_ps={ps_us / check_us:.0f}"
    )
    cgroup = Cgroup.of_self()
    if cgroup is not None:
        ws_us = per_call_us(cgroup.working_set, args.n // 20)
        full_us = per_call_us(cgroup.read, args.n // 200)
        tree_us = per_call_us(lambda: tree_pss(os.getpid()), args.n // 200)
        print()
        print(f"{'watchdog reading':<34} {'µs/read':>10} {'vs kept fds':>13}")
        for name, us in [
            ("cgroup working_set() (kept fds)", ws_us),
            ("cgroup read() (all four files)", full_us),
            ("tree PSS (smaps_rollup)", tree_us),
        ]:
            print(f"{name:<34} {us:>10.2f} {us / ws_us:>12.1f}x")
        last += f" cgroup_ws_us={ws_us:.1f} cgroup_read_us={full_us:.1f}"
    print(last)


if __name__ == "__main__":
    main()
