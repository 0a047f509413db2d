"""The kernel's OOM kills in our memory cgroup: a failure of the ladder, seen and said.

The cgroup counts them (``oom_kill`` in v1's ``memory.oom_control``, v2's
``memory.events``). The last count seen is kept in the state dir, keyed by the cgroup, so
the worker that comes after one says that its predecessor was OOM-killed; the watchdog
looks again about once a second, for a pool child killed while the worker lives on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

from memwarden import state
from memwarden.gauges.cgroup import Cgroup


class OomWatch:
    """New OOM kills in ``cgroup`` since the last look (by any warden of this state dir)."""

    def __init__(self, cgroup: Cgroup, state_dir: str) -> None:
        self.cgroup = cgroup
        key = hashlib.sha256(cgroup.path.encode()).hexdigest()[:16]
        self.path = os.path.join(state_dir, f"oom-{key}")
        self.seen = self._stored()

    def count(self) -> int | None:
        """The cgroup's OOM-kill counter now (None when it cannot be read)."""
        try:
            return self.cgroup.read().oom_kills
        except (OSError, ValueError):
            return None

    def new_kills(self) -> int:
        """Kills counted since the last look, remembered for the next look and lifetime."""
        now = self.count()
        if now is None:
            return 0
        before = self.seen if self.seen is not None else 0
        self.seen = now
        if now != before:
            self._store(now)
        return max(0, now - before)

    def _stored(self) -> int | None:
        try:
            return int((state.read_text(self.path) or "").strip())
        except ValueError:
            return None

    def _store(self, count: int) -> None:
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            state.write_atomic(self.path, str(count))
