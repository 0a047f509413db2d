"""When to act: a pure state machine over (memory, time). No I/O, no clock of its own.

Cheapest remedy first. Over the soft limit: reclaim (gc + malloc_trim; in a prefork worker
also in its pool children, whose result is waited for a moment), then recycle one pool
child where the framework has one, then — if memory stays over for ``grace`` seconds —
restart the worker. At the hard limit: reclaim once more if it has not just been tried, then
kill at once (the kernel or platform would do worse a moment later).

Near the quota the hard limit is judged on where memory will be at the next reading, not
only where it is: over the soft limit, a rise sustained over the last two intervals that
would carry memory past the hard limit within ``lookahead`` seconds is a crossing (a job
growing hundreds of MiB/s crosses the last few percent between two readings, and the kernel
does not wait). Such a crossing skips the reclaim: memory allocated that fast is live.

Restarts are held back by a minimum uptime that doubles with each restart in the window
(back-off), and by a cap on restarts per window. A process whose very first reading is
already over the soft limit gets no soft restarts at all: restarting it cannot help (the
Celery #4125 loop), so the warden says so loudly and only the hard limit still acts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from memwarden.units import format_duration, format_size


class Action(str, Enum):
    OK = "ok"
    WAIT = "wait"  # over the soft limit, holding back (grace, uptime, cap, restart under way)
    RECLAIM = "reclaim"
    RECYCLE_CHILD = "recycle_child"
    RESTART = "restart"
    KILL = "kill"


#: Readings closer together than this (s) do not update the growth rate.
MIN_RATE_DT = 0.005
#: The furthest ahead (s) a rise is projected, however far off the next reading is: a
#: projection is a guess, and a wrong one kills a job that would have stayed under.
MAX_LOOKAHEAD = 0.1


@dataclass(frozen=True)
class Limits:
    """Resolved limits (bytes, seconds). ``soft``/``hard`` None: that layer is off."""

    soft: int | None
    hard: int | None
    grace: float = 120.0
    min_uptime: float = 30.0
    max_restarts: int = 3
    restart_window: float = 3600.0
    reclaim: bool = True
    reclaim_cooldown: float = 30.0
    #: Growth since the last reclaim that earns another one inside the cooldown: a heap
    #: that bloats again within seconds is trimmed again, not restarted (default: 10% of
    #: the first limit).
    reclaim_regrow: int | None = None
    can_recycle: bool = False

    @property
    def enabled(self) -> bool:
        return self.soft is not None or self.hard is not None


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    total: int
    limit: int | None = None
    #: Set by :meth:`Policy.at_start` when the process starts over its soft limit: the
    #: caller logs it as an error.
    alarm: bool = False


@dataclass
class Policy:
    """Feed it readings with ``observe(total, now)``; tell it what was done."""

    limits: Limits
    started_at: float
    past_restarts: Sequence[float] = ()
    over_since: float | None = None
    reclaimed_at: float | None = None
    reclaimed_total: int | None = None
    recycled_in_episode: bool = False
    #: Until then, a reclaim asked of other processes (pool children) may still show:
    #: the next soft remedy waits for it.
    settles_at: float | None = None
    restarting: bool = False
    killed: bool = False
    starts_above: bool = False
    #: Over the soft limit, a sustained rise that reaches the hard limit within this many
    #: seconds counts as reaching it: the delay to the next reading, which the watchdog
    #: sets (0: judge each reading alone).
    lookahead: float = 0.0
    #: Sustained growth, bytes/s: the smaller of the last two intervals' rises (0 unless
    #: both rose), and for how long it has been seen (those two intervals, s).
    rate: float = 0.0
    rate_span: float = 0.0
    #: Set by the last reading when a rise would cross the hard limit within the lookahead
    #: but has not lasted that long yet: the next reading should come at the alert pace,
    #: whatever readings cost.
    look_soon: bool = False
    _restarts: list[float] = field(default_factory=list, repr=False)
    _prev: tuple[float, int] | None = field(default=None, repr=False)
    _prev_rate: float = field(default=0.0, repr=False)
    _prev_dt: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._restarts = sorted(self.past_restarts)

    def restarts_in_window(self, now: float) -> int:
        window = self.limits.restart_window
        return sum(1 for t in self._restarts if now - t < window)

    def required_uptime(self, now: float) -> float:
        """Minimum uptime, doubled for each restart already in the window (back-off)."""
        return self.limits.min_uptime * (2 ** self.restarts_in_window(now))

    def observe(self, total: int, now: float, project: bool = True) -> Decision:
        """Decide on a reading of ``total`` bytes at ``now``; ``project=False`` judges the
        hard limit on this reading alone (no :attr:`lookahead`)."""
        lim = self.limits
        self.look_soon = False
        self._track(total, now)
        if self.reclaimed_total is not None and total < self.reclaimed_total:
            # Regrowth counts from the lowest point after a reclaim: memory may go on
            # falling once it has run (the pool children's trims land a moment later).
            self.reclaimed_total = total
        if self.killed:
            return Decision(Action.WAIT, "kill under way", total, lim.hard)
        crossing = self._crossing(total) if project else None
        if crossing is not None:
            if self.over_since is None:
                self.over_since = now
            return crossing
        if lim.hard is not None and total >= lim.hard:
            if self.over_since is None:
                self.over_since = now
            if lim.reclaim and not self._reclaimed_recently(now, total):
                return Decision(Action.RECLAIM, "over hard limit", total, lim.hard)
            return Decision(
                Action.KILL,
                f"{format_size(total)} over hard limit {format_size(lim.hard)}",
                total,
                lim.hard,
            )
        if lim.soft is None or total < lim.soft:
            self.over_since = None
            self.recycled_in_episode = False
            return Decision(Action.OK, "under soft limit", total, lim.soft)
        if self.over_since is None:
            self.over_since = now
        over = f"{format_size(total)} over soft limit {format_size(lim.soft)}"
        if lim.reclaim and not self._reclaimed_recently(now, total):
            return Decision(Action.RECLAIM, over, total, lim.soft)
        if self.settles_at is not None and now < self.settles_at:
            return Decision(Action.WAIT, f"{over}, reclaim in the pool under way", total, lim.soft)
        if lim.can_recycle and not self.recycled_in_episode:
            return Decision(Action.RECYCLE_CHILD, over, total, lim.soft)
        if self.starts_above:
            why = f"{over} since start: a restart cannot help, soft restarts are off"
            return Decision(Action.WAIT, why, total, lim.soft)
        if self.restarting:
            return Decision(Action.WAIT, "restart under way", total, lim.soft)
        waited = now - self.over_since
        if waited < lim.grace:
            left = format_duration(lim.grace - waited)
            return Decision(Action.WAIT, f"{over}, grace {left} left", total, lim.soft)
        uptime, need = now - self.started_at, self.required_uptime(now)
        if uptime < need:
            why = f"{over}, uptime {format_duration(uptime)} < {format_duration(need)}"
            return Decision(Action.WAIT, why, total, lim.soft)
        if self.restarts_in_window(now) >= lim.max_restarts:
            why = (
                f"{over}, but {lim.max_restarts} restarts in the last "
                f"{format_duration(lim.restart_window)} already: raise the limit or fix the job"
            )
            return Decision(Action.WAIT, why, total, lim.soft)
        return Decision(Action.RESTART, f"{over} for {format_duration(waited)}", total, lim.soft)

    @property
    def rise(self) -> float:
        """The last interval's growth, bytes/s (negative when memory fell)."""
        return self._prev_rate

    def _track(self, total: int, now: float) -> None:
        """Update :attr:`rate` from this reading (readings closer than ``MIN_RATE_DT`` apart
        are too close to judge and leave the base as it was)."""
        if self._prev is not None:
            then, before = self._prev
            dt = now - then
            if dt < MIN_RATE_DT:
                return
            rise = (total - before) / dt
            sustained = rise > 0 and self._prev_rate > 0
            self.rate = min(rise, self._prev_rate) if sustained else 0.0
            self.rate_span = dt + self._prev_dt if sustained else 0.0
            self._prev_rate, self._prev_dt = rise, dt
        self._prev = (now, total)

    def _crossing(self, total: int) -> Decision | None:
        """KILL when a sustained rise over the soft limit reaches the hard one within
        :attr:`lookahead` — projected no further than the rise has lasted; where only that
        cap saves it, :attr:`look_soon` asks for the next reading at once. None otherwise."""
        lim = self.limits
        if lim.hard is None or total >= lim.hard or self.lookahead <= 0 or self.rate <= 0:
            return None
        if lim.soft is not None and total < lim.soft:
            return None
        horizon = min(self.lookahead, MAX_LOOKAHEAD)
        if total + self.rate * horizon < lim.hard:
            return None
        if self.rate_span < horizon:  # a burst seen for less time than the horizon
            horizon = self.rate_span
            if total + self.rate * horizon < lim.hard:
                self.look_soon = True
                return None
        why = (
            f"{format_size(total)} rising {format_size(self.rate)}/s: over hard limit "
            f"{format_size(lim.hard)} within {horizon:.2g}s"
        )
        return Decision(Action.KILL, why, total, lim.hard)

    def at_start(self, total: int) -> Decision:
        """The reading taken when the process starts. Over the soft limit already: a restart
        cannot help, so soft restarts are off for this lifetime and the decision's ``alarm``
        asks the caller to say so loudly."""
        lim = self.limits
        if lim.soft is not None and total >= lim.soft:
            self.starts_above = True
            why = f"starts at {format_size(total)}, over its soft limit {format_size(lim.soft)}"
            return Decision(Action.WAIT, why, total, lim.soft, alarm=True)
        return Decision(Action.OK, "starts under the soft limit", total, lim.soft)

    def _reclaimed_recently(self, now: float, total: int) -> bool:
        if self.reclaimed_at is None or now - self.reclaimed_at >= self.limits.reclaim_cooldown:
            return False
        regrow = self.limits.reclaim_regrow
        if regrow is None or self.reclaimed_total is None:
            return True
        return total - self.reclaimed_total < regrow

    def did_reclaim(self, now: float, total_after: int | None = None) -> None:
        """A reclaim ran at ``now``; ``total_after`` is the reading after it."""
        self.reclaimed_at = now
        self.reclaimed_total = total_after

    def did_ask(self, settles_at: float) -> None:
        """Other processes were asked to reclaim; their memory may fall until ``settles_at``."""
        self.settles_at = settles_at

    def did_recycle(self) -> None:
        self.recycled_in_episode = True

    def did_restart(self, now: float) -> None:
        self.restarting = True
        self._restarts.append(now)

    def did_kill(self) -> None:
        self.killed = True

    def did_recover(self) -> None:
        """The kill took only a child (an RQ work horse) and we live on: watch afresh."""
        self.killed = False
        self.over_since = None

    def did_dry_run(self, now: float) -> None:
        """A dry-run restart: start a fresh grace period so it is not decided every reading."""
        self.over_since = now
