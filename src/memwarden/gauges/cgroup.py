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

import os
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
    rel = path
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        rel = path[len(mount_root) :]
    full = mount_point.rstrip("/") + "/" + rel.lstrip("/")
    return os.path.join(root, full.lstrip("/")) if root else full


class Cgroup:
    """A memory cgroup directory of version 1 or 2."""

    def __init__(self, path: str, version: int, top: str | None = None) -> None:
        self.path = path
        self.version = version
        self.top = top or path  # the mount point: v2 limits are searched up to here

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
        v1_path = v2_path = None
        for line in lines.splitlines():
            hier, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hier == "0" and controllers == "":
                v2_path = path
            elif "memory" in controllers.split(","):
                v1_path = path
        if v1_path is not None:
            for mount_root, point, fstype, opts in mounts:
                if fstype == "cgroup" and "memory" in opts.split(","):
                    found = _join(root, point, mount_root, v1_path)
                    if os.path.exists(os.path.join(found, "memory.usage_in_bytes")):
                        return cls(found, 1)
        if v2_path is not None:
            for mount_root, point, fstype, _opts in mounts:
                if fstype != "cgroup2":
                    continue
                top = os.path.join(root, point.lstrip("/")) if root else point
                found = _join(root, point, mount_root, v2_path)
                if os.path.exists(os.path.join(found, "memory.current")):
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
        return self.read().working_set
