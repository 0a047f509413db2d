"""Per-process memory from /proc: RSS fast path, USS/PSS, and the process tree.

- Own RSS: ``os.pread`` on a kept fd of ``/proc/self/statm`` (no open/close per read); the
  fd is re-opened after ``fork`` so a child never reads its parent's figure.
- USS/PSS: ``/proc/<pid>/smaps_rollup``; its cost grows with the mapping (about 10 ms per
  GB), so it is read on demand, never on the per-job fast path.
- A process tree is summed by PSS, never by RSS: forked children share copy-on-write pages
  with their parent and RSS counts every shared page once per process.

Off Linux (no /proc) every function falls back to psutil.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import psutil

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
HAS_PROC = os.path.exists("/proc/self/statm")


class SelfRss:
    """Own resident set size in bytes, cheaply, safe across fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self._pid = -1
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        # The inherited fd points at the parent's /proc/self resolved at open time.
        fd, self._fd, self._pid = self._fd, -1, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _open(self) -> int:
        with self._lock:
            if self._fd < 0:
                self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
                self._pid = os.getpid()
            return self._fd

    def __call__(self) -> int:
        fd = self._fd
        if fd < 0:
            if not HAS_PROC:
                return int(psutil.Process().memory_info().rss)
            fd = self._open()
        # "size resident shared text lib data dt", in pages; the fork hook resets the fd
        return int(os.pread(fd, 128, 0).split(None, 2)[1]) * PAGE_SIZE


self_rss = SelfRss()


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (someone else's counts: it is not gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def stat_fields(pid: int) -> list[bytes] | None:
    """``/proc/<pid>/stat``'s fields after the command name, from the state (``[0]``) on —
    ``[6]`` the flags, ``[19]`` the start time; None if it is gone (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()
    except OSError:
        return None


def rss(pid: int) -> int:
    """RSS of any process in bytes (0 if it is gone)."""
    try:
        if HAS_PROC:
            with open(f"/proc/{pid}/statm", "rb") as f:
                return int(f.read().split()[1]) * PAGE_SIZE
        return int(psutil.Process(pid).memory_info().rss)
    except (OSError, psutil.Error, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class ProcessMemory:
    """Figures of one process, bytes."""

    pid: int
    rss: int
    pss: int
    uss: int
    swap: int = 0


def smaps_rollup(pid: int) -> ProcessMemory | None:
    """RSS, PSS, USS (private clean + dirty) and swap of ``pid``; None if it is gone."""
    try:
        if HAS_PROC and os.path.exists(f"/proc/{pid}/smaps_rollup"):
            fields: dict[str, int] = {}
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 3 and parts[2] == b"kB":
                        fields[parts[0].rstrip(b":").decode()] = int(parts[1]) * 1024
            uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
            return ProcessMemory(
                pid, fields.get("Rss", 0), fields.get("Pss", 0), uss, fields.get("Swap", 0)
            )
        info = psutil.Process(pid).memory_full_info()
        return ProcessMemory(
            pid, info.rss, getattr(info, "pss", info.rss), info.uss, getattr(info, "swap", 0)
        )
    except (OSError, psutil.Error, ValueError):
        return None


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` from ``/proc/<pid>/task/*/children`` (no /proc scan)."""
    if not HAS_PROC:
        try:
            return [p.pid for p in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return kids


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, walking children links only."""
    seen: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        if not os.path.exists(f"/proc/{pid}") and HAS_PROC:
            continue
        seen.append(pid)
        stack.extend(children_of(pid))
    return seen


def tree_pss(root: int) -> tuple[int, int]:
    """(PSS sum, RSS sum) of ``root``'s tree; the PSS sum is the honest total."""
    pss_total = rss_total = 0
    for pid in process_tree(root):
        mem = smaps_rollup(pid)
        if mem is not None:
            pss_total += mem.pss
            rss_total += mem.rss
    return pss_total, rss_total
