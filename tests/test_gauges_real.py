"""Real processes that really allocate, measured by RSS, PSS and a real cgroup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from cgroups import memory_cgroup
from conftest import wait_for
from memwarden.gauges import CgroupGauge, TreeGauge
from memwarden.gauges.proc import process_tree, rss, self_rss, smaps_rollup, tree_pss

MB = 1024 * 1024


def spawn(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        text=True,
        **kw,
    )


def ready(proc: subprocess.Popen, word: str = "ready") -> str:
    line = proc.stdout.readline().strip()
    assert line.startswith(word), line
    return line


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


_PINNED: list[bytearray] = []


def test_a_test_that_leaves_resident_holes_in_the_heap():
    """As the suite's earlier tests do (a CI run): about 290 MiB freed but still resident,
    one object pinning the top of the heap. The next test must still see its allocations
    move RSS (conftest's ``_fresh_heap_pages``)."""
    before = self_rss()
    junk = [bytearray(1000) for _ in range(300_000)]
    _PINNED.append(junk[-1])
    del junk
    assert self_rss() - before > 200 * MB


def test_self_rss_is_the_kernels_figure_and_follows_fork():
    with open("/proc/self/status") as f:
        vmrss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
    assert abs(self_rss() - vmrss) < 8 * MB
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child grows; its reading must be its own, not the parent's fd
        os.close(read)
        before = self_rss()
        blob = b"\x01" * (64 * MB)
        os.write(write, f"{before} {self_rss()} {len(blob)}".encode())
        os._exit(0)
    os.close(write)
    before, after, _ = (int(x) for x in os.read(read, 200).split())
    os.waitpid(pid, 0)
    assert after - before >= 60 * MB
    assert self_rss() < after  # the parent did not grow


def test_child_that_allocates_is_measured_by_rss_and_pss():
    proc = spawn("""
        import sys, time
        blob = b"\\x01" * (200 * 1024 * 1024)
        print("ready", flush=True)
        time.sleep(120)
    """)
    try:
        ready(proc)
        mem = smaps_rollup(proc.pid)
        assert mem is not None
        assert 200 * MB <= mem.rss < 260 * MB
        assert 200 * MB <= mem.pss <= mem.rss
        assert 200 * MB <= mem.uss <= mem.rss
        assert abs(rss(proc.pid) - mem.rss) < 4 * MB
    finally:
        stop(proc)


def test_forked_children_are_not_double_counted():
    """A parent with 300 MB and four forked children that share it copy-on-write:
    summed RSS says ~1.5 GB, PSS says the truth (~300 MB)."""
    proc = spawn(
        """
        import os, sys, time
        blob = b"\\x01" * (300 * 1024 * 1024)
        kids = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                time.sleep(120)
                os._exit(0)
            kids.append(pid)
        print("ready", *kids, flush=True)
        time.sleep(120)
        """,
        start_new_session=True,
    )
    try:
        kids = [int(x) for x in ready(proc).split()[1:]]
        tree = wait_for(lambda: len(process_tree(proc.pid)) == 5 and process_tree(proc.pid))
        assert set(tree) == {proc.pid, *kids}
        pss, summed_rss = tree_pss(proc.pid)
        assert summed_rss >= 5 * 300 * MB
        assert 300 * MB <= pss < 400 * MB
        assert TreeGauge(proc.pid).read().total == pytest.approx(pss, rel=0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_a_real_memory_cgroup_is_read_for_real():
    with memory_cgroup(256 * MB) as cg:
        proc = spawn(
            """
            import time
            blob = b"\\x01" * (100 * 1024 * 1024)
            print("ready", flush=True)
            time.sleep(120)
            """,
            preexec_fn=cg.join,
        )
        try:
            ready(proc)
            mem = cg.cgroup.read()
            assert mem.limit == 256 * MB
            assert 100 * MB <= mem.usage < 256 * MB
            assert 100 * MB <= mem.working_set <= mem.usage
            assert mem.anon >= 100 * MB
            assert mem.oom_kills == 0
            assert CgroupGauge(cg.cgroup).read().total >= 100 * MB
        finally:
            stop(proc)


def test_reclaim_frees_a_really_fragmented_heap():
    """Threads allocate mixed sizes and keep 1 in 20: RSS stays up; reclaim gets most back."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent("""
            import json
            from memwarden import workload
            from memwarden.gauges.proc import self_rss
            from memwarden.reclaim import reclaim, mallinfo2
            start = self_rss()
            kept = workload.fragment(mb=200, threads=4, keep_every=20, together=True)
            frag = mallinfo2()
            got = reclaim(self_rss)
            print(json.dumps({"start": start, "before": got.before, "after": got.after,
                              "kept": kept, "free_in_heap": frag["fordblks"]}))
            """),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"},
    )
    assert out.returncode == 0, out.stderr
    import json

    r = json.loads(out.stdout)
    grown = r["before"] - r["start"]
    freed = r["before"] - r["after"]
    assert grown > 4 * r["kept"]  # the heap really is fragmented: RSS far above what is live
    assert r["free_in_heap"] > 2 * r["kept"]  # mallinfo2 sees the holes
    assert freed > 0.5 * (grown - r["kept"]), r  # most of the dead space goes back
