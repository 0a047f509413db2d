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

No rung starves the next: the grace counts from the first crossing whatever reclaims run
on the way — a dip just under the soft limit that a reclaim won ends no episode
(:data:`EPISODE_QUIET`) — a reclaim that leaves memory over the soft limit is followed at
once by the next rung's check, and a heap that regrows soon after a reclaim is trimmed
again only while no other rung is due (a recycle not yet taken, a grace run out). The
grace is cut short — a graceful restart now, whatever the minimum uptime — when memory
would reach the hard limit before the grace (and a drain) is over at the pace it grows
(growth-aware grace), and when the worker has no job in hand: nothing will
bring it down, and its drain is instant.

Restarts are held back by a minimum uptime that doubles with each *looping* restart in the
window (back-off), and by a cap on looping restarts per window. A restart loops when the
lifetime it ends started near its soft limit already: restarting it gained little. A
restart of a worker that started low and grew is a cure, however often it is needed. A
process whose very first reading is already over the soft limit gets no soft restarts at
all: restarting it cannot help (the Celery #4125 loop), so the warden says so loudly and
only the hard limit still acts.

Over the soft limit the worker's intake is paused (:attr:`Policy.paused`): jobs in hand go
on, no new job starts, and intake resumes when memory falls back under the limit.

Optionally, sustained *full* memory pressure (PSI, the signal systemd-oomd and oomd act on)
counts like being over the soft limit, under it: full avg10 at or over
``Limits.pressure_full`` for ``pressure_hold`` seconds runs the same ladder — reclaim, pause,
recycle, then a graceful restart once the reclaim has had ``PSI_SETTLE`` seconds to show
(the hold was the grace; minimum uptime, cap and "starts above" hold). Such a restart always
counts as looping: pressure says nothing of where the lifetime started.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from memwarden.events import Cause, State
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
#: A lifetime that starts at this share of its soft limit or above loops when restarted:
#: such restarts count towards ``max_restarts`` and the uptime back-off; others are cures.
LOOP_SHARE = 0.8
#: The trend of memory is the rise over the last ``TREND_WINDOW`` seconds of readings (one
#: kept per ``TREND_STEP``), once they span ``MIN_TREND_SPAN`` at least: long enough to see
#: growth that comes in steps at job ends, short enough to forget a start-up's loading.
TREND_WINDOW = 30.0
TREND_STEP = 1.0
MIN_TREND_SPAN = 0.5
#: A restart decided is called off when the jobs in hand are done only under this share
#: of the soft limit: just under it (a fragmented heap a reclaim got back a little of),
#: resumed intake brings the next crossing within moments, too late for a graceful one.
CALL_OFF_SHARE = 0.9
#: Nor within this many seconds of the last call-off: a second crossing so soon is no
#: passing spike but the level itself (stranded memory and the load), met again at once.
CALL_OFF_AGAIN_AFTER = 30.0
#: An episode over the soft limit (its grace clock) outlives a dip under it that stays over
#: ``CALL_OFF_SHARE`` of it for less than this many seconds: a reclaim that won back a few
#: MiB of a fragmented heap, with the next crossing moments away, ends no episode.
EPISODE_QUIET = 30.0
#: Seconds a reclaim gets to show in PSI's avg10 before pressure calls for the next rung.
PSI_SETTLE = 10.0


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
    #: What a drain may take (s): the grace is cut short when memory would reach the hard
    #: limit before the grace left plus this.
    drain_time: float = 25.0
    #: Full memory pressure (avg10, a fraction) that, held for ``pressure_hold`` seconds,
    #: counts as being over the soft limit (None: off).
    pressure_full: float | None = None
    pressure_hold: float = 30.0

    @property
    def enabled(self) -> bool:
        return self.soft is not None or self.hard is not None


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    #: Why, for people (logs, the journal's ``reason``); code reads :attr:`cause`.
    reason: str
    total: int
    limit: int | None = None
    #: Set by :meth:`Policy.at_start` when the process starts over its soft limit: the
    #: caller logs it as an error.
    alarm: bool = False
    #: Why, for code (the journal's ``cause``).
    cause: Cause | None = None

    @property
    def capped(self) -> bool:
        """A WAIT because the restart cap is reached: the caller says so (once an episode)."""
        return self.cause is Cause.CAPPED


@dataclass
class Policy:
    """Feed it readings with ``observe(total, now)``; tell it what was done."""

    limits: Limits
    started_at: float
    past_restarts: Sequence[float] = ()
    over_since: float | None = None
    #: When the episode began: the grace counts from here. Unlike :attr:`over_since` it
    #: outlives a shallow, short dip under the soft limit (:data:`EPISODE_QUIET`).
    grace_since: float | None = None
    reclaimed_at: float | None = None
    reclaimed_total: int | None = None
    recycled_in_episode: bool = False
    #: Until then, a reclaim asked of other processes (pool children) may still show:
    #: the next soft remedy waits for it.
    settles_at: float | None = None
    restarting: bool = False
    killed: bool = False
    starts_above: bool = False
    #: The lifetime's first reading: a restart of a lifetime that started at
    #: ``LOOP_SHARE`` of the soft limit or above is a loop.
    start_total: int | None = None
    #: Intake is paused: over the soft limit (no new jobs; resumes under it).
    paused: bool = False
    #: Full pressure at or over ``Limits.pressure_full`` since then (None: under it), the
    #: last figure given, and whether the ladder runs for pressure (under the soft limit).
    pressure_since: float | None = None
    pressure: float | None = None
    pressured: bool = False
    #: When a restart was last called off (None: never in this lifetime).
    called_off_at: float | None = None
    _trend: deque[tuple[float, int]] = field(default_factory=deque, repr=False)
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
    _last_over: float | None = field(default=None, repr=False)
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
        return self.limits.min_uptime * (2.0 ** self.restarts_in_window(now))

    def observe(
        self,
        total: int,
        now: float,
        project: bool = True,
        busy: bool | None = None,
        pressure: float | None = None,
    ) -> Decision:
        """Decide on a reading of ``total`` bytes at ``now``; ``project=False`` judges the
        hard limit on this reading alone (no :attr:`lookahead`); ``busy`` says whether a job
        is in hand (None: not known); ``pressure`` is the cgroup's full PSI avg10 as a
        fraction (None: no new figure, the last one stands)."""
        lim = self.limits
        self.look_soon = False
        if self.start_total is None:
            self.start_total = total
        self._track(total, now)
        held = self._pressure_held(pressure, now)
        if self.reclaimed_total is not None and total < self.reclaimed_total:
            # Regrowth counts from the lowest point after a reclaim: memory may go on
            # falling once it has run (the pool children's trims land a moment later).
            self.reclaimed_total = total
        if self.killed:
            return Decision(
                Action.WAIT, "kill under way", total, lim.hard, cause=Cause.KILL_UNDER_WAY
            )
        crossing = self._crossing(total) if project else None
        if crossing is not None:
            self._over(now)
            return crossing
        if lim.hard is not None and total >= lim.hard:
            self._over(now)
            # Still rising at the hard limit: that memory is live, and a reclaim would only
            # give it the time to reach the quota.
            rising = self._prev_rate > 0 or self.rate > 0
            if lim.reclaim and not rising and not self._reclaimed_recently(now, total):
                return Decision(
                    Action.RECLAIM, "over hard limit", total, lim.hard, cause=Cause.OVER_HARD
                )
            return Decision(
                Action.KILL,
                f"{format_size(total)} over hard limit {format_size(lim.hard)}",
                total,
                lim.hard,
                cause=Cause.OVER_HARD,
            )
        over_soft = lim.soft is not None and total >= lim.soft
        self.pressured = not over_soft and held is not None
        if over_soft:
            self._over(now)
            over = f"{format_size(total)} over soft limit {format_size(lim.soft)}"
            return self._ladder(total, now, busy, over, Cause.OVER_SOFT)
        self.over_since = None
        lingers = self._lingers(total, now)
        if not lingers:
            self.grace_since = None
        if held is not None:
            return self._ladder(total, now, busy, held, Cause.PRESSURE)
        self.recycled_in_episode = False
        if self.paused and lingers and not self.restarting:
            return self._just_under(total, busy)
        self.paused = False
        return Decision(Action.OK, "under soft limit", total, lim.soft, cause=Cause.UNDER_SOFT)

    def _just_under(self, total: int, busy: bool | None) -> Decision:
        """Paused, and a reclaim won memory back only just under the soft limit: the jobs
        in hand finish first. Then a worker that can only restart restarts (its drain is
        instant, and resumed intake would cross again at once, its jobs' own churn over a
        level this close to the limit); a pool resumes (its recycle comes at the next
        crossing: an idle child leaves only after one more task)."""
        lim = self.limits
        just = f"{format_size(total)} just under soft limit {format_size(lim.soft)}"
        if busy is not False:
            why = f"{just}: intake paused until the jobs in hand are done"
            return Decision(Action.WAIT, why, total, lim.soft, cause=Cause.JUST_UNDER)
        if lim.can_recycle:
            self.paused = False
            return Decision(Action.OK, just, total, lim.soft, cause=Cause.UNDER_SOFT)
        why = f"{just}, intake paused and no job in hand"
        return Decision(Action.RESTART, why, total, lim.soft, cause=Cause.NO_JOB_IN_HAND)

    def _over(self, now: float) -> None:
        """This reading is over the soft limit: the episode goes on, or begins (also after
        a dip that was short at its last reading but has lasted :data:`EPISODE_QUIET`)."""
        last = self._last_over
        if self.over_since is None and last is not None and now - last >= EPISODE_QUIET:
            self.grace_since = None
        if self.over_since is None:
            self.over_since = now
        if self.grace_since is None:
            self.grace_since = now
        self._last_over = now

    def _lingers(self, total: int, now: float) -> bool:
        """An episode survives this reading under the soft limit: a shallow dip, just over
        ``CALL_OFF_SHARE`` of it, and a short one."""
        soft, last = self.limits.soft, self._last_over
        if self.grace_since is None or soft is None or last is None:
            return False
        return total >= soft * CALL_OFF_SHARE and now - last < EPISODE_QUIET

    def _pressure_held(self, pressure: float | None, now: float) -> str | None:
        """The reason when full pressure has stayed at or over the threshold for the hold
        time (keeping when it began), else None."""
        lim = self.limits
        if pressure is not None:
            self.pressure = pressure
        if lim.pressure_full is None or self.pressure is None or self.pressure < lim.pressure_full:
            self.pressure_since = None
            return None
        if self.pressure_since is None:
            self.pressure_since = now
        held = now - self.pressure_since
        if held < lim.pressure_hold:
            return None
        return f"memory pressure: full {self.pressure:.0%} for {format_duration(held)}"

    def _ladder(
        self, total: int, now: float, busy: bool | None, over: str, base: Cause
    ) -> Decision:
        """The soft rungs, over the soft limit or under :attr:`pressured` (``over`` says
        which, ``base`` is its cause): reclaim, pause, recycle, then a graceful restart."""
        lim = self.limits
        # A heap that regrew since the last reclaim is trimmed again only while the ladder
        # has nothing else due (the recycle rung, a grace run out): else each crossing is
        # trimmed back just under, flaps, and the next rung never comes.
        recycle_next = lim.can_recycle and not self.recycled_in_episode
        grace_over = self.grace_since is not None and now - self.grace_since >= lim.grace
        regrow = not (recycle_next or grace_over)
        # Intake pauses at the crossing, beside the reclaim, and only where a restart can
        # follow: a worker that started over its limit, or whose restarts are capped,
        # would otherwise stop serving for good.
        capped = self.restarts_in_window(now) >= lim.max_restarts
        self.paused = not (self.starts_above or capped)
        if lim.reclaim and not self._reclaimed_recently(now, total, regrow=regrow):
            return self._at_soft(Action.RECLAIM, over, total, base)
        before = self._before_restart(total, now, over, base)
        if before is not None:
            return before
        return self._restart_rung(total, now, busy, over, base)

    def _at_soft(self, action: Action, why: str, total: int, cause: Cause) -> Decision:
        """A decision of the soft rungs (its limit the soft limit)."""
        return Decision(action, why, total, self.limits.soft, cause=cause)

    def _before_restart(self, total: int, now: float, over: str, base: Cause) -> Decision | None:
        """The rungs between the reclaim and a restart: a reclaim settling, a recycle, or a
        wait while a restart cannot help, is under way or is capped; None past them."""
        lim = self.limits
        if self.settles_at is not None and now < self.settles_at:
            why = f"{over}, reclaim in the pool under way"
            return self._at_soft(Action.WAIT, why, total, Cause.RECLAIM_SETTLING)
        if lim.can_recycle and not self.recycled_in_episode:
            return self._at_soft(Action.RECYCLE_CHILD, over, total, base)
        if self.starts_above:
            why = f"{over} since start: a restart cannot help, soft restarts are off"
            return self._at_soft(Action.WAIT, why, total, Cause.STARTS_ABOVE)
        if self.restarting:
            return self._at_soft(Action.WAIT, "restart under way", total, Cause.RESTART_UNDER_WAY)
        if self.restarts_in_window(now) >= lim.max_restarts:
            why = (
                f"{over}, but {lim.max_restarts} restarts in the last "
                f"{format_duration(lim.restart_window)} already: raise the limit or fix the job"
            )
            return self._at_soft(Action.WAIT, why, total, Cause.CAPPED)
        if (
            self.pressured
            and self.reclaimed_at is not None
            and now - self.reclaimed_at < PSI_SETTLE
        ):
            why = f"{over}, reclaim not yet seen in PSI"
            return self._at_soft(Action.WAIT, why, total, Cause.PRESSURE_SETTLING)
        return None

    def _restart_rung(
        self, total: int, now: float, busy: bool | None, over: str, base: Cause
    ) -> Decision:
        """The graceful restart: at once with no job in hand or when growth would reach
        the hard limit before the grace ends; else once the grace and the uptime are
        over, a wait until then."""
        lim = self.limits
        if busy is False:
            # Under pressure the pressure is the cause: the metrics and the report have
            # always filed such restarts under it.
            idle = Cause.NO_JOB_IN_HAND if base is Cause.OVER_SOFT else base
            return self._at_soft(Action.RESTART, f"{over} with no job in hand", total, idle)
        if self.over_since is not None and self.grace_since is not None:
            waited = now - self.grace_since  # the grace (pressure's was its hold)
            eta = self._eta_hard(total, now)
            if eta is not None:
                why = f"{over}, rising: hard limit in {format_duration(eta)}, before grace ends"
                return self._at_soft(Action.RESTART, why, total, Cause.GROWTH)
            if waited < lim.grace:
                left = format_duration(lim.grace - waited)
                return self._at_soft(Action.WAIT, f"{over}, grace {left} left", total, Cause.GRACE)
            over = f"{over} for {format_duration(waited)}"
            base = Cause.GRACE_OVER
        uptime, need = now - self.started_at, self.required_uptime(now)
        if uptime < need:
            why = f"{over}, uptime {format_duration(uptime)} < {format_duration(need)}"
            return self._at_soft(Action.WAIT, why, total, Cause.UPTIME)
        return self._at_soft(Action.RESTART, over, total, base)

    def _eta_hard(self, total: int, now: float) -> float | None:
        """Seconds until memory reaches the hard limit at the pace it grows, when that is
        before the grace left and a drain are over; None otherwise. The pace is the faster
        of the sustained rise and the trend (:data:`TREND_WINDOW`)."""
        lim = self.limits
        if lim.hard is None or self.over_since is None or self.grace_since is None:
            return None
        rate = max(self.rate, self.trend(total, now))
        if rate <= 0:
            return None
        eta = max(0.0, (lim.hard - total) / rate)
        left = max(0.0, lim.grace - (now - self.grace_since))
        return eta if eta < left + lim.drain_time else None

    def trend(self, total: int, now: float) -> float:
        """Bytes/s over the kept readings of the last :data:`TREND_WINDOW` (0 when they span
        less than :data:`MIN_TREND_SPAN`)."""
        if not self._trend:
            return 0.0
        then, before = self._trend[0]
        span = now - then
        return (total - before) / span if span >= MIN_TREND_SPAN else 0.0

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
        trend = self._trend
        while trend and now - trend[0][0] > TREND_WINDOW:
            trend.popleft()
        if not trend or now - trend[-1][0] >= TREND_STEP:
            trend.append((now, total))

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
        return Decision(Action.KILL, why, total, lim.hard, cause=Cause.PROJECTED_HARD)

    def at_start(self, total: int) -> Decision:
        """The reading taken when the process starts. Over the soft limit already: a restart
        cannot help, so soft restarts are off for this lifetime and the decision's ``alarm``
        asks the caller to say so loudly."""
        lim = self.limits
        self.start_total = total
        if lim.soft is not None and total >= lim.soft:
            self.starts_above = True
            why = f"starts at {format_size(total)}, over its soft limit {format_size(lim.soft)}"
            return Decision(Action.WAIT, why, total, lim.soft, alarm=True, cause=Cause.STARTS_ABOVE)
        why = "starts under the soft limit"
        return Decision(Action.OK, why, total, lim.soft, cause=Cause.STARTS_UNDER)

    def _reclaimed_recently(self, now: float, total: int, regrow: bool = True) -> bool:
        """A reclaim ran within the cooldown, and (``regrow``) memory has not regrown by
        ``reclaim_regrow`` since."""
        if self.reclaimed_at is None or now - self.reclaimed_at >= self.limits.reclaim_cooldown:
            return False
        if not regrow:
            return True
        regrow_by = self.limits.reclaim_regrow
        if regrow_by is None or self.reclaimed_total is None:
            return True
        return total - self.reclaimed_total < regrow_by

    def did_reclaim(self, now: float, total_after: int | None = None) -> None:
        """A reclaim ran at ``now``; ``total_after`` is the reading after it."""
        self.reclaimed_at = now
        self.reclaimed_total = total_after

    def did_ask(self, settles_at: float) -> None:
        """Other processes were asked to reclaim; their memory may fall until ``settles_at``."""
        self.settles_at = settles_at

    def did_recycle(self) -> None:
        self.recycled_in_episode = True

    @property
    def loops(self) -> bool:
        """A restart of this lifetime would loop: it started near its soft limit already,
        or the restart is for pressure (where it started says nothing of that)."""
        soft = self.limits.soft
        start = self.start_total
        near = soft is not None and start is not None and start >= LOOP_SHARE * soft
        return near or self.pressured

    def did_restart(self, now: float) -> None:
        """A restart began; it counts towards the cap and the back-off if it :attr:`loops`."""
        self.restarting = True
        if self.loops:
            self._restarts.append(now)

    def may_call_off(self, total: int, now: float) -> bool:
        """Whether a restart decided may be called off at ``total`` once the jobs in hand
        are done: well under the soft limit, and not again moments after the last one."""
        soft = self.limits.soft
        if soft is None or total >= soft * CALL_OFF_SHARE:
            return False
        return self.called_off_at is None or now - self.called_off_at >= CALL_OFF_AGAIN_AFTER

    def did_call_off(self, now: float) -> None:
        """The restart was called off: memory fell well under the soft limit once the
        jobs in hand were done (a spike). Watch afresh."""
        self.restarting = False
        self.called_off_at = now

    def state(self, total: int | None) -> State:
        """What the warden is doing, ``total`` being the last reading (None: none yet)."""
        hard = self.limits.hard
        if not self.limits.enabled:
            return State.OFF
        if self.killed:
            return State.KILLED
        if self.restarting:
            return State.RESTARTING
        if total is not None and hard is not None and total >= hard:
            return State.OVER_HARD
        if self.over_since is not None:
            return State.OVER_SOFT
        return State.PAUSED if self.paused else State.OK

    def did_kill(self) -> None:
        self.killed = True

    def did_recover(self) -> None:
        """The kill took only a child (an RQ work horse) and we live on: watch afresh."""
        self.killed = False
        self.over_since = self.grace_since = None

    def did_dry_run(self, now: float) -> None:
        """A dry-run restart: start a fresh grace period so it is not decided every reading."""
        self.over_since = self.grace_since = now
