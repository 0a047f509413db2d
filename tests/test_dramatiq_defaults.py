"""Dramatiq with **default memwarden settings** (only the cgroup's limit): whole-worker
remedies are graceful — a drain, then Dramatiq's reload — on a fast leak and on a slow one;
no hard kill, no kernel OOM kill, every message runs exactly once.

The real ``dramatiq`` CLI on the Redis broker (Dramatiq's default heartbeat and maintenance)
in a real memory cgroup. Messages keep 2–8 MiB each, half as one big (mmap'd) buffer, half
as small heap objects.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from apps.dramatiq_harness import REDIS_URL, Tree, dramatiq_tree, expect, unacked
from cgroups import memory_cgroup
from conftest import need_service

pytestmark = pytest.mark.slow


@pytest.fixture
def store() -> Iterator[redis.Redis]:
    need_service("Redis", 6379)
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def send_leaks(tree: Tree, count: int, io_ms: int, sizes: tuple[float, float]) -> set[str]:
    """``count`` messages keeping a random size in ``sizes`` (MiB), big and small alike."""
    rnd = random.Random(13)
    jobs = set()
    for i in range(count):
        kind = "buffers" if i % 2 else "leak"
        tree.send(f"k{i}", kind, round(rnd.uniform(*sizes), 1), io_ms=io_ms)
        jobs.add(f"k{i}")
    return jobs


def assert_graceful(tree: Tree, jobs: set[str], oom_kills: int, least: int) -> None:
    restarts = tree.records("restart")
    assert len(restarts) >= least, restarts
    assert {r["action"] for r in restarts} == {"reload"}
    assert tree.records("kill") == [], tree.records("kill")
    assert oom_kills == 0
    assert tree.exits == []  # the CLI never exited: every remedy was its own reload
    runs = tree.runs()
    assert {j: runs[j] for j in jobs if runs[j] != 1} == {}
    assert not unacked(tree)


def test_fast_leak_of_concurrent_messages_is_met_by_reloads(
    tmp_path: Path, store: redis.Redis
) -> None:
    """2 processes x 2 threads, messages keeping 2–8 MiB each after 0.1 s of I/O: the tree
    grows at 50-100 MiB/s, 1.2 GB in all, over twice its 512 MB quota."""
    with (
        memory_cgroup(512 * 10**6) as dyno,
        dramatiq_tree(
            "redis", tmp_path, store, {}, dyno.join, processes=2, threads=2, heartbeat_ms=None
        ) as tree,
    ):
        jobs = send_leaks(tree, 240, io_ms=100, sizes=(2, 8))
        expect(
            lambda: tree.done() >= jobs,
            240,
            lambda: f"all done; {len(jobs - tree.done())} missing\n{tree.tail()}",
        )
        assert_graceful(tree, jobs, dyno.oom_kills(), least=2)


def test_slow_leak_is_met_by_a_reload(tmp_path: Path, store: redis.Redis) -> None:
    """1 process x 2 threads, a message every 0.8 s per thread keeping 1 MiB: about 2 MiB/s,
    100 MiB in all in a 128 MB dyno whose tree starts near 40 MB."""
    with (
        memory_cgroup(128 * 10**6) as dyno,
        dramatiq_tree(
            "redis", tmp_path, store, {}, dyno.join, processes=1, threads=2, heartbeat_ms=None
        ) as tree,
    ):
        jobs = send_leaks(tree, 100, io_ms=800, sizes=(1, 1))
        expect(
            lambda: tree.done() >= jobs,
            240,
            lambda: f"all done; {len(jobs - tree.done())} missing\n{tree.tail()}",
        )
        assert_graceful(tree, jobs, dyno.oom_kills(), least=1)
