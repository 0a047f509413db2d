"""The memory cgroup a process lives in, read the way the platform reads it.

The kernel OOM-kills a cgroup when its *charged* memory (usage, which includes page cache)
cannot be reclaimed under the limit. Page cache is reclaimable, so it must not trigger a
restart. memwarden checks the limit against the **working set** — usage minus inactive
file cache — the figure the kubelet and cAdvisor use for eviction and ``kubectl top``.

Both hierarchies are handled, and hybrid ones (a ``0::/`` line for cgroup2 beside a v1
memory controller, as on this project's CI machines): the v1 memory controller wins when
the process has one, else the unified (v2) hierarchy is used if it has the memory
controller. ``root`` lets tests point every path at a fixture tree of real file contents.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

UNLIMITED_V1 = 1 << 62  # v1 reports "no limit" as a page-rounded 2**63 - 1


@dataclass(frozen=True)
class CgroupMemory:
    """One reading of a memory cgroup, bytes (limit None when unlimited)."""

    version: int
    usage: int
    working_set: int
    anon: int
    inactive_file: int
    limit: int | None
    oom_kills: int


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _stat(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _proc_self(root: str, name: str) -> str:
    return os.path.join(root, "proc/self", name) if root else f"/proc/self/{name}"


def _mounts(root: str) -> list[tuple[str, str, str, str]]:
    """(mount root, mount point, fs type, super options) of cgroup mounts."""
    mounts = []
    for line in _read(_proc_self(root, "mountinfo")).splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append((fields[3], fields[4], tail[0], tail[2]))
    return mounts


def _join(root: str, mount_point: str, mount_root: str, path: str) -> str:
    """The directory of cgroup ``path`` (as /proc/self/cgroup names it) under a mount."""
    rel = path
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        rel = path[len(mount_root) :]
    ups = _above_namespace(mount_root)
    if ups:
        rel = _found_below(root, mount_point, ups, path) or rel
    full = (mount_point.rstrip("/") + "/" + rel.strip("/")).rstrip("/") or "/"
    return os.path.join(root, full.lstrip("/")) if root else full


def _above_namespace(mount_root: str) -> int:
    """How many levels a mount's root lies above this process's cgroup namespace root (a
    namespace that kept its parent's mount shows it as ``/../..``); 0 when not above."""
    parts = [p for p in mount_root.split("/") if p]
    return len(parts) if parts and all(p == ".." for p in parts) else 0


def _found_below(root: str, mount_point: str, ups: int, path: str) -> str | None:
    """``<ns root>/path`` relative to the mount: the one directory ``ups`` levels down whose
    ``path`` holds this process (the names above a namespace are not told; each level
    searched is one directory listing)."""
    top = os.path.join(root, mount_point.lstrip("/")) if root else mount_point
    me = str(os.getpid())
    level = [""]
    for _ in range(ups):
        below = []
        for rel in level:
            with contextlib.suppress(OSError):
                for entry in os.scandir(os.path.join(top, rel) if rel else top):
                    if entry.is_dir(follow_symlinks=False):
                        below.append(os.path.join(rel, entry.name))
        level = below
    for rel in level:
        candidate = os.path.join(rel, path.strip("/")) if path.strip("/") else rel
        with (
            contextlib.suppress(OSError, ValueError),
            open(os.path.join(top, candidate, "cgroup.procs")) as f,
        ):
            if me in f.read().split():
                return "/" + candidate
    return None


def tracking_dir(root: str = "") -> str | None:
    """A cgroup directory of this process in which child cgroups can hold processes without
    moving their memory: v1's ``pids`` (else ``freezer``) hierarchy, v2's unified one (a
    child there has no controller of its own: its memory stays charged to, and counted by,
    this cgroup). None where there is none."""
    try:
        lines = _read(_proc_self(root, "cgroup"))
        mounts = _mounts(root)
    except OSError:
        return None
    own: dict[str, str] = {}
    for line in lines.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for c in controllers.split(",") if controllers else (["" if hier == "0" else "?"]):
            own[c] = path
    for name in ("pids", "freezer"):
        if name in own:
            for mount_root, point, fstype, opts in mounts:
                if fstype == "cgroup" and name in opts.split(","):
                    return _join(root, point, mount_root, own[name])
    if "" in own:
        for mount_root, point, fstype, _opts in mounts:
            if fstype == "cgroup2":
                return _join(root, point, mount_root, own[""])
    return None


def _memory_paths(lines: str) -> tuple[str | None, str | None]:
    """This process's memory cgroup paths in ``/proc/self/cgroup``: version 1's, version 2's."""
    v1_path = v2_path = None
    for line in lines.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    return v1_path, v2_path


def _v1_dir(root: str, mounts: list[tuple[str, str, str, str]], path: str) -> str | None:
    """The directory of version 1 cgroup ``path`` under a memory controller's mount."""
    for mount_root, point, fstype, opts in mounts:
        if fstype == "cgroup" and "memory" in opts.split(","):
            found = _join(root, point, mount_root, path)
            if os.path.exists(os.path.join(found, "memory.usage_in_bytes")):
                return found
    return None


def _charged(found: str, top: str) -> str | None:
    """The version 2 cgroup ``found``'s memory is charged to, up to the mount ``top``.

    A cgroup whose parent gives it no memory controller (``memwarden run``'s command
    cgroup, a systemd unit's leaf) is charged to the nearest ancestor that has one: that
    is the cgroup to read."""
    while not os.path.exists(os.path.join(found, "memory.current")):
        if os.path.normpath(found) == os.path.normpath(top) or len(found) <= 1:
            return None
        found = os.path.dirname(found)
    return found


class Cgroup:
    """A memory cgroup directory of version 1 or 2."""

    def __init__(self, path: str, version: int, top: str | None = None) -> None:
        self.path = path
        self.version = version
        self.top = top or path  # the mount point: v2 limits are searched up to here
        # working_set()'s kept files: cgroup files read the same from any process, so the
        # fds may be inherited across fork; pread on one is serialized by the kernel.
        self._fds: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Cgroup(v{self.version}, {self.path!r})"

    @classmethod
    def of_self(cls, root: str = "") -> Cgroup | None:
        """The memory cgroup of this process, or None where there is none to read."""
        try:
            lines = _read(_proc_self(root, "cgroup"))
            mounts = _mounts(root)
        except OSError:
            return None
        v1_path, v2_path = _memory_paths(lines)
        if v1_path is not None:
            found = _v1_dir(root, mounts, v1_path)
            if found is not None:
                return cls(found, 1)
        if v2_path is not None:
            for mount_root, point, fstype, _opts in mounts:
                if fstype != "cgroup2":
                    continue
                top = os.path.join(root, point.lstrip("/")) if root else point
                found = _charged(_join(root, point, mount_root, v2_path), top)
                if found is not None:
                    return cls(found, 2, top)
        return None

    def limit(self) -> int | None:
        """The effective limit: v1 hierarchical, v2 the smallest ``memory.max`` upwards."""
        if self.version == 1:
            stat = _stat(os.path.join(self.path, "memory.stat"))
            limit = stat.get("hierarchical_memory_limit")
            if limit is None:
                limit = int(_read(os.path.join(self.path, "memory.limit_in_bytes")))
            return None if limit >= UNLIMITED_V1 else limit
        best: int | None = None
        path = self.path
        while True:
            try:
                raw = _read(os.path.join(path, "memory.max")).strip()
                if raw != "max":
                    best = int(raw) if best is None else min(best, int(raw))
            except OSError:
                pass
            if os.path.normpath(path) == os.path.normpath(self.top) or path in ("/", ""):
                break
            path = os.path.dirname(path)
        return best

    def read(self) -> CgroupMemory:
        """Usage, working set, anon, inactive file, limit and OOM kills."""
        if self.version == 1:
            usage = int(_read(os.path.join(self.path, "memory.usage_in_bytes")))
            stat = _stat(os.path.join(self.path, "memory.stat"))
            inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
            anon = stat.get("total_rss", stat.get("rss", 0))
            oom = _stat(os.path.join(self.path, "memory.oom_control")).get("oom_kill", 0)
        else:
            usage = int(_read(os.path.join(self.path, "memory.current")))
            stat = _stat(os.path.join(self.path, "memory.stat"))
            inactive, anon = stat.get("inactive_file", 0), stat.get("anon", 0)
            try:
                oom = _stat(os.path.join(self.path, "memory.events")).get("oom_kill", 0)
            except OSError:
                oom = 0
        return CgroupMemory(
            version=self.version,
            usage=usage,
            working_set=max(0, usage - inactive),
            anon=anon,
            inactive_file=inactive,
            limit=self.limit(),
            oom_kills=oom,
        )

    def working_set(self) -> int:
        """The working set alone, cheaply: ``pread`` on two kept fds and one search in
        ``memory.stat`` (about 20 µs on v1, where :meth:`read` opens four files: 350 µs).
        The watchdog reads this; near the quota it reads it every ``alert_interval``."""
        fds = self._fds or self._open()
        usage = int(os.pread(fds[0], 64, 0))
        stat = b"\n" + _pread_all(fds[1])
        key = INACTIVE_KEY[self.version]
        at = stat.find(key)
        if at < 0 and self.version == 1:  # no hierarchy totals: the cgroup's own figure
            key = INACTIVE_KEY[2]
            at = stat.find(key)
        inactive = 0 if at < 0 else int(stat[at + len(key) : stat.find(b"\n", at + 1)])
        return max(0, usage - inactive)

    def _open(self) -> tuple[int, int]:
        usage = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        with self._lock:
            if self._fds is None:
                flags = os.O_RDONLY | os.O_CLOEXEC
                first = os.open(os.path.join(self.path, usage), flags)
                try:
                    self._fds = (first, os.open(os.path.join(self.path, "memory.stat"), flags))
                except OSError:
                    os.close(first)
                    raise
            return self._fds

    def close(self) -> None:
        """Close the kept fds of :meth:`working_set` (it opens them again when needed)."""
        with self._lock:
            fds, self._fds = self._fds, None
        for fd in fds or ():
            with contextlib.suppress(OSError):
                os.close(fd)


#: The inactive file cache line of ``memory.stat``: v1 hierarchical total, v2 (or v1 own).
INACTIVE_KEY = {1: b"\ntotal_inactive_file ", 2: b"\ninactive_file "}


def _pread_all(fd: int) -> bytes:
    """A whole small file by ``pread`` from offset 0 (memory.stat: 1–4 KiB)."""
    size = 16384
    while True:
        data = os.pread(fd, size, 0)
        if len(data) < size:
            return data
        size *= 4
