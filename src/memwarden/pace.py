"""When the next reading is due, and which readings are journaled.

One pace for the in-process watchdog and for ``memwarden run``: readings every ``interval``,
closer (``alert_interval``) when memory is near or rising fast toward the first limit, and
never more than ``READ_BUDGET`` of a core spent reading."""

from __future__ import annotations

import time
from collections.abc import Callable

from memwarden.config import Config
from memwarden.gauges import Sample

#: The most of a core the watchdog's readings may take.
READ_BUDGET = 0.02
#: Seconds between two ``sample`` records of a quiet watchdog.
SAMPLE_EVERY = 1.0


class Pace:
    """When the next reading is due, and which readings are journaled: one for the
    in-process watchdog and for ``memwarden run``."""

    def __init__(self, config: Config, first_limit: int | None) -> None:
        self.config = config
        self.first_limit = first_limit  # the soft limit, else the hard one
        self.read_cost = 0.0  # CPU seconds per reading (decaying max)
        self.fastest_rise = 0.0  # bytes/s: the fastest rise between readings seen so far
        self._recorded_at = 0.0  # monotonic time of the last ``sample`` record

    def timed(self, read: Callable[[], Sample]) -> Sample:
        """``read()``, keeping what readings cost: CPU, not wall time (waiting for the GIL
        costs nothing); a slow one weighs at once, a fast one slowly."""
        t0 = time.thread_time()
        sample = read()
        took = time.thread_time() - t0
        self.read_cost = max(took, 0.8 * self.read_cost + 0.2 * took)
        return sample

    def interval_after(self, total: int, rise: float, urgent: bool = False) -> float:
        """Seconds to the next reading after one of ``total`` bytes, rising ``rise``
        bytes/s: ``interval``, or ``alert_interval`` over the first limit and under it when
        this rise, or the fastest seen so far, would carry memory over it by the next regular
        reading (a fast job is then followed closely from before it starts, so the lookahead
        has readings to go on). Stretched so that readings take at most ``READ_BUDGET`` of a
        core — unless ``urgent`` (:attr:`Policy.look_soon`): then ``alert_interval``."""
        self.fastest_rise = max(self.fastest_rise, rise)  # never below 0: it starts there
        if urgent:
            return self.config.alert_interval
        interval = self.config.interval
        ahead = total + self.fastest_rise * interval
        if self.first_limit is not None and ahead >= self.first_limit:
            interval = min(interval, self.config.alert_interval)
        return max(interval, self.read_cost / READ_BUDGET)

    def record_due(self, quiet: bool = True) -> bool:
        """True when a ``sample`` record is due: at most one per ``SAMPLE_EVERY`` (or per
        ``interval`` if longer) while ``quiet``, always when the reading was acted on."""
        now = time.monotonic()
        if quiet and now - self._recorded_at < max(SAMPLE_EVERY, self.config.interval):
            return False
        self._recorded_at = now
        return True
