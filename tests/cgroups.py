"""A real memory-limited "dyno" for tests: a cgroup v1 (or v2) child of our own cgroup.

``memory_cgroup(limit)`` makes one, or skips with the reason where the machine does not let
us (never in CI, where cgroups are expected to be writable on this project's machines —
set MEMWARDEN_TEST_NO_CGROUP=1 to declare otherwise). Processes join it through
``preexec_fn=cg.join``; on exit every process left in it is killed and it is removed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest

from memwarden.gauges.cgroup import Cgroup


class TestCgroup:
    __test__ = False

    def __init__(self, path: str, version: int) -> None:
        self.path = path
        self.version = version
        self.cgroup = Cgroup(path, version)

    def join(self) -> None:
        """For ``preexec_fn``: move the calling (child) process into this cgroup."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def add(self, pid: int) -> None:
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def pids(self) -> list[int]:
        with open(os.path.join(self.path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]

    def oom_kills(self) -> int:
        return self.cgroup.read().oom_kills

    def kill_all(self) -> None:
        for _ in range(50):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)


def _skip(reason: str) -> None:
    pytest.skip(f"memory cgroups are not writable here: {reason}")


def _write(path: str, name: str, value: int, optional: bool = False) -> None:
    try:
        with open(os.path.join(path, name), "w") as f:
            f.write(str(value))
    except OSError:
        if not optional:
            raise


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[TestCgroup]:
    own = Cgroup.of_self()
    if own is None:
        _skip("this process has no memory cgroup")
    assert own is not None
    path = os.path.join(own.path, f"memwarden-test-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(path)
    except OSError as exc:
        _skip(f"cannot create {path}: {exc}")
    cg = TestCgroup(path, own.version)
    try:
        if own.version == 1:
            _write(path, "memory.limit_in_bytes", limit)
            _write(path, "memory.memsw.limit_in_bytes", limit, optional=True)  # no swap
            _write(path, "memory.swappiness", 0, optional=True)
        else:
            _write(path, "memory.max", limit)
            _write(path, "memory.swap.max", 0, optional=True)
        yield cg
    finally:
        cg.kill_all()
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.1)
