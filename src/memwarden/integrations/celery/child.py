"""A Celery prefork pool child's side (runs in billiard's children): its own warden over
its USS, a ``job`` record per task, the reclaim FIFO the worker asks through, and its
recycle by Celery's own ``worker_max_memory_per_child`` path."""

from __future__ import annotations

import contextlib
import os
import time

import billiard.pool

from memwarden.config import Config
from memwarden.gauges import Sample
from memwarden.gauges.proc import self_rss, smaps_rollup
from memwarden.gauges.quota import Quota, detect_platform
from memwarden.hooks import Hooks
from memwarden.integrations.celery.common import ChildFiles
from memwarden.reclaim import ReclaimRequests
from memwarden.restart import NoRestart
from memwarden.warden import Warden

#: A child never restarts the worker: its soft layer ends at "recycle after this task".
NEVER = 365 * 24 * 3600.0  # the longest duration a setting takes


class UssGauge:
    """This process's USS (private pages): what a pool child alone would give back."""

    source = "uss"

    def read(self) -> Sample:
        mem = smaps_rollup(os.getpid())
        own = self_rss()
        return Sample(time.time(), mem.uss if mem is not None else own, own, "uss")


class PoolChild:
    """One pool child's warden (none without a ``share``): after each task, a child whose
    USS is over its share reclaims, then recycles — billiard's after-task memory check,
    answered with current USS instead of ``ru_maxrss`` (a peak that a freshly forked child
    inherits, so it would recycle after every task). The worker asks it to reclaim through
    its FIFO, or to recycle through its flag."""

    def __init__(self, config: Config, share: int | None, files: ChildFiles) -> None:
        self.share = share
        self.files = files
        self.warden: Warden | None = None
        self._recycle_at: int | None = None  # USS that asked for recycling
        self._requests: ReclaimRequests | None = None  # the worker's reclaim asks
        if share is None:
            return
        platform = detect_platform(os.environ)
        self.warden = Warden(
            config,
            gauge=UssGauge(),
            quota=Quota(None, "prefork child share", platform),
            restarter=NoRestart(),
            locks=[],
            hooks=Hooks(recycle=self._recycle),
            framework="celery",
            soft_limit=f"{share}B",  # a bare int would be KiB
            hard_limit=None,
            grace=NEVER,
            min_uptime=0.0,
        )
        billiard.pool.mem_rss = self._memory_kib
        if config.reclaim:
            # Asked, a child reclaims at once but decides nothing: billiard can let it go
            # only after a task, so its recycle is decided there (an idle child deciding
            # now would record a recycle and then run one more task).
            warden = self.warden
            self._requests = ReclaimRequests(
                files.reclaim_fifo(os.getpid()),
                lambda: warden.reclaim_now("asked by the worker: over its soft limit", False),
            ).listen()

    def close(self) -> None:
        """The child leaves (recycled): its FIFO goes too."""
        if self._requests is not None:
            self._requests.close()

    def _recycle(self, reason: str) -> bool:
        total = self.warden.state.total if self.warden is not None else None
        self._recycle_at = total if total is not None else self.share
        return True

    def _memory_kib(self) -> int:
        """billiard's after-task memory figure (KiB) for its ``worker_max_memory_per_child``
        check: over the limit exactly when this child's warden, or the worker by its
        flag, asked to recycle."""
        share_kib = max(1, (self.share or 0) // 1024)
        flag = self.files.recycle_flag(os.getpid())
        if self._recycle_at is None and os.path.exists(flag):
            with contextlib.suppress(OSError):
                os.unlink(flag)
            mem = smaps_rollup(os.getpid())
            self._recycle_at = mem.uss if mem is not None else self_rss()  # main journaled it
        if self._recycle_at is not None:
            return max(share_kib + 1, self._recycle_at // 1024)
        return share_kib
