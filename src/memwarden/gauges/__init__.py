"""Reading memory the way the platform does.

Three gauges, each giving a :class:`Sample` whose ``total`` is the figure the limit is
checked against:

- ``cgroup``: the working set of the process's memory cgroup (usage − inactive file cache),
  what Kubernetes and the kernel judge. Used when the process's cgroup has a limit.
- ``tree``: the PSS sum of a process tree the gauge tracks itself (root and descendants via
  ``/proc/<pid>/task/*/children``; no full /proc scan). PSS splits shared copy-on-write pages
  among the processes sharing them, so forked pool children are not double counted.
- ``process``: the process's own RSS by the ``statm`` fast path (about a microsecond).

Never ``getrusage().ru_maxrss``: it is the peak of the process's life, not its size now.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from memwarden.gauges.cgroup import Cgroup, CgroupMemory
from memwarden.gauges.proc import self_rss, smaps_rollup, tree_pss
from memwarden.gauges.quota import Quota, detect_quota
from memwarden.units import SettingError

MEASURES = ("auto", "cgroup", "tree", "process")

__all__ = [
    "MEASURES",
    "Cgroup",
    "CgroupGauge",
    "CgroupMemory",
    "Gauge",
    "ProcessGauge",
    "Quota",
    "Sample",
    "TreeGauge",
    "choose_gauge",
    "detect_quota",
    "self_rss",
    "smaps_rollup",
    "tree_pss",
]


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading: ``total`` is what the limit is checked against, ``rss`` is our own."""

    t: float
    total: int
    rss: int
    source: str


class Gauge(Protocol):
    source: str

    def read(self) -> Sample: ...


class ProcessGauge:
    """Own RSS: the per-job fast path."""

    source = "process"

    def read(self) -> Sample:
        value = self_rss()
        return Sample(time.time(), value, value, "process")


class TreeGauge:
    """PSS of a process tree (default: this process and its descendants)."""

    source = "tree"

    def __init__(self, root: int | None = None) -> None:
        self.root = root

    def read(self) -> Sample:
        root = self.root if self.root is not None else os.getpid()
        pss, _ = tree_pss(root)
        own = self_rss() if root == os.getpid() else pss
        return Sample(time.time(), pss, own, "tree")


class CgroupGauge:
    """Working set of a memory cgroup."""

    source = "cgroup"

    def __init__(self, cgroup: Cgroup) -> None:
        self.cgroup = cgroup

    def read(self) -> Sample:
        return Sample(time.time(), self.cgroup.working_set(), self_rss(), "cgroup")


def choose_gauge(
    measure: str, quota: Quota, cgroup: Cgroup | None, root: int | None = None
) -> Gauge:
    """The gauge for ``MEMWARDEN_MEASURE``; ``auto`` is cgroup when the quota is the cgroup's."""
    if measure not in MEASURES:
        raise SettingError("MEMWARDEN_MEASURE", measure, f"one of {', '.join(MEASURES)}", "auto")
    if measure == "auto":
        measure = "cgroup" if cgroup is not None and quota.source.startswith("cgroup") else "tree"
    if measure == "cgroup":
        if cgroup is None:
            raise SettingError(
                "MEMWARDEN_MEASURE", "cgroup", "this process has no memory cgroup to read", "tree"
            )
        return CgroupGauge(cgroup)
    if measure == "tree":
        return TreeGauge(root)
    return ProcessGauge()


def environment_quota(env: Mapping[str, str] | None = None) -> tuple[Quota, Cgroup | None]:
    """Detect the quota for this process from ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env
    cgroup = Cgroup.of_self()
    return detect_quota(env, cgroup), cgroup
