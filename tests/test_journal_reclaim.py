"""Journal files shared by processes, rotation, torn lines; reclaim under jemalloc."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import IN_CI
from memwarden.journal import Journal, read_records

JEMALLOC = ctypes.util.find_library("jemalloc")  # e.g. libjemalloc.so.2 (Debian libjemalloc2)


def test_records_carry_event_ts_pid_and_land_in_the_ring(tmp_path):
    j = Journal(str(tmp_path / "j.jsonl"), ring=3)
    for i in range(5):
        j.write("job", job="k", job_id=i)
    j.close()
    lines = (tmp_path / "j.jsonl").read_text().splitlines()
    assert len(lines) == 5
    first = json.loads(lines[0])
    assert first["event"] == "job" and first["pid"] == os.getpid() and first["ts"] > 1e9
    assert [r["job_id"] for r in j.recent] == [2, 3, 4]


def test_many_processes_append_whole_lines(tmp_path):
    path = str(tmp_path / "shared.jsonl")
    code = textwrap.dedent(f"""
        import os
        from memwarden.journal import Journal
        j = Journal({path!r})
        if os.fork() == 0:
            for i in range(500):
                j.write("job", job="child", job_id=i, pad="x" * 300)
            os._exit(0)
        for i in range(500):
            j.write("job", job="parent", job_id=i, pad="y" * 300)
        os.wait()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    with open(path) as f:
        records, bad = read_records(f)
    assert bad == 0
    assert len(records) == 3 * 1000
    assert len({r["pid"] for r in records}) == 6


def test_rotation_keeps_backups_and_reopens_across_processes(tmp_path):
    path = str(tmp_path / "r.jsonl")
    j = Journal(path, max_bytes=2000, backups=2)
    for i in range(100):
        j.write("sample", rss=i, pad="z" * 50)
    j.close()
    assert os.path.exists(path + ".1") and os.path.exists(path + ".2")
    assert not os.path.exists(path + ".3")
    for name in (path, path + ".1", path + ".2"):
        assert os.path.getsize(name) <= 2000
    with open(path) as f:
        last = [json.loads(line)["rss"] for line in f][-1]
    assert last == 99


def test_torn_and_foreign_lines_are_counted_and_skipped():
    lines = [
        json.dumps({"event": "job", "ts": 1.0, "pid": 1, "job": "a"}),
        '{"event": "job", "ts": 2.0, "pi',  # a worker killed mid-write
        "not json at all",
        json.dumps([1, 2, 3]),
        "",
        json.dumps({"event": "sample", "ts": 3.0, "pid": 1, "rss": 5, "new_field": True}),
    ]
    records, bad = read_records(lines)
    assert [r["event"] for r in records] == ["job", "sample"]
    assert bad == 3


def test_reclaim_purges_jemalloc_arenas():
    if JEMALLOC is None:
        if IN_CI:
            pytest.fail("jemalloc is missing on the CI machine (apt-get install libjemalloc2)")
        pytest.skip("jemalloc is not installed: apt-get install libjemalloc2 to run this test")
    code = textwrap.dedent("""
        import json
        from memwarden import reclaim, workload
        from memwarden.gauges.proc import self_rss
        start = self_rss()
        # In this thread: jemalloc purges an exiting thread's memory itself, and a purge
        # measured then races that teardown (the threads' frees land after join()).
        workload.fragment(mb=200, threads=0, keep_every=20)
        got = reclaim.reclaim(self_rss)
        print(json.dumps({"alloc": reclaim.allocator()["name"], "grown": got.before - start,
                          "freed": got.freed, "trimmed": got.trimmed}))
    """)
    env = {**os.environ, "LD_PRELOAD": JEMALLOC}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["alloc"] == "jemalloc" and r["trimmed"]
    assert r["grown"] > 150 * 1024 * 1024, r  # the freed blocks stayed in jemalloc's arenas
    assert r["freed"] > 0.5 * r["grown"], r  # and the purge gave them back (gc alone: ~0)
