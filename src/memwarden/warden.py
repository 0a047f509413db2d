"""The engine: gauge → policy → response, from job hooks and a watchdog thread.

Integrations call ``job_started``/``job_finished`` (or ``with warden.job(...)``) and pass
:class:`Hooks` for what only the framework can do (stop fetching, recycle a pool child,
count a poison job before a kill). Everything here is guarded: an exception inside the
warden is logged and swallowed at the hook boundary, never raised into a job.

The after-job check is the fast path: own RSS by ``statm`` (about a microsecond) moves the
last full reading by our own growth since then; only when that estimate crosses a limit is
the full gauge (cgroup working set, tree PSS) read again. The watchdog reads the full gauge
every ``interval`` and catches a breach in the middle of a long job.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar, Unpack

from memwarden import reclaim as reclaim_mod
from memwarden import state as state_dir
from memwarden.config import Config, WardenOptions
from memwarden.coordination import HostLock, Once, RestartLock
from memwarden.events import Cause, action_word, cause_field
from memwarden.fleet import Fleet
from memwarden.gauges import Gauge, ProcessGauge, Quota, Sample
from memwarden.gauges.pressure import Signals
from memwarden.gauges.proc import children_of, process_tree, rss, self_rss
from memwarden.hooks import Hooks as Hooks  # memwarden.warden.Hooks: the old home
from memwarden.hooks import WardenState
from memwarden.journal import Journal
from memwarden.oom import OomWatch
from memwarden.pace import SAMPLE_EVERY, Pace
from memwarden.policy import Action, Decision, Policy
from memwarden.restart import Restarter, make_restarter
from memwarden.setup import set_up
from memwarden.trace import LiveFigures, Tracer
from memwarden.units import format_size
from memwarden.wardens import being_killed, name_this_thread, runs_warden

log = logging.getLogger("memwarden")
F = TypeVar("F", bound=Callable[..., Any])


#: Seconds a reclaim asked of the pool children has to show before the next soft remedy
#: (a child's trim took 18-40 ms in the quota bench; the hard limit is judged meanwhile).
RECLAIM_SETTLE = 0.5

#: A condition that holds (restarts capped, an unusable state dir) is said again at most
#: this often (s).
SAY_AGAIN_AFTER = 60.0

#: Seconds a kill left to a larger sibling process waits for its memory to be freed after it
#: is gone (a killed process's pages are uncharged from the cgroup a moment after its end).
SIBLING_SETTLE = 1.0
#: After that, while memory is not rising, up to this long (s): the killed sibling's memory
#: is still being given back (slowly on a busy machine, where an exit waits for a CPU).
SIBLING_SETTLE_MAX = 10.0

#: The after-job decision while well under the limits (no allocation on the fast path).
UNDER = Decision(Action.OK, "under soft limit", 0, cause=Cause.UNDER_SOFT)


def swallow_but(*let_through: type[BaseException]) -> Callable[[F], F]:
    """:func:`swallow`, except that ``let_through`` exceptions pass: the host framework's
    control flow, raised from its signal handlers into whatever code the main thread runs
    (RQ's ``StopRequested``), is not ours to eat."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except let_through:
                raise
            except Exception:
                log.exception("memwarden: internal error in %s (job unaffected)", fn.__name__)
                return None

        return guarded  # type: ignore[return-value]

    return decorate


#: The hook boundary: log any exception from inside the warden, never raise it.
swallow = swallow_but()


@contextlib.contextmanager
def signals_held(signums: Iterable[int]) -> Iterator[None]:
    """Hold the host's handlers of ``signums`` for the length of the block (main thread
    only): a signal that comes is noted, then handled as it would have been once the block
    is done — its handler may raise (RQ's ``StopRequested``), but not in our bookkeeping.
    Elsewhere than the main thread (where handlers never run) it holds nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[tuple[int, Any]] = []
    held = [n for n in signums if signal.getsignal(n) is not None]  # None: set outside Python
    saved = {n: signal.signal(n, lambda n, frame: came.append((n, frame))) for n in held}
    try:
        yield
    finally:
        for n, handler in saved.items():
            signal.signal(n, handler)
        for n, frame in came:
            handler = saved[n]
            if callable(handler):
                handler(n, frame)
            else:  # the default action (or ignore), as if it came now
                signal.raise_signal(n)


class RestartHistory:
    """Restarts on this host (a small JSON file of ``[time, loops]`` pairs): the looping
    ones (:attr:`Policy.loops`) for the per-window cap, all of them for ``status``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def entries(self) -> list[tuple[float, bool]]:
        try:
            raw = json.loads(state_dir.read_text(self.path) or "[]")
            # A bare time (an older file) counts as a loop: the cap as it was.
            return [
                (float(e), True) if not isinstance(e, list) else (float(e[0]), bool(e[1]))
                for e in raw
            ]
        except (OSError, ValueError, TypeError, IndexError):
            return []

    def load(self) -> list[float]:
        """Times of every restart."""
        return [t for t, _ in self.entries()]

    def loops(self) -> list[float]:
        """Times of the restarts that looped: what the cap counts."""
        return [t for t, loops in self.entries() if loops]

    def add(self, t: float, keep: float, loops: bool = True) -> None:
        kept = [[x, lp] for x, lp in self.entries() if t - x < keep] + [[t, loops]]
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        state_dir.write_atomic(self.path, json.dumps(kept))


class Warden:
    """Keeps this worker inside its quota. ``Warden.from_env()`` reads ``MEMWARDEN_*``."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        hooks: Hooks | None = None,
        gauge: Gauge | None = None,
        quota: Quota | str | int | None = None,
        restarter: Restarter | None = None,
        journal: Journal | str | None = None,
        locks: list[RestartLock] | None = None,
        env: Mapping[str, str] | None = None,
        framework: str | None = None,
        **settings: Unpack[WardenOptions],
    ) -> None:
        options: dict[str, Any] = dict(settings)
        env = os.environ if env is None else env
        # `journal="w.jsonl"` and `quota="1GB"` are the settings of those names.
        if isinstance(journal, str):
            options["journal"], journal = journal, None
        if isinstance(quota, (str, int)):
            options["quota"], quota = quota, None
        self.config = (
            Config.from_env(env, **options) if config is None else config.replace(**options)
        )
        self.hooks = hooks or Hooks()
        self.framework = framework
        where = set_up(
            self.config,
            env,
            quota=quota,
            can_recycle=self.hooks.recycle is not None,
            pool_reclaim=self.hooks.reclaim is not None,
        )
        cgroup, self.quota, self.limits = where.cgroup, where.quota, where.limits
        self.gauge = gauge or where.gauge(self.config)
        self.restarter = restarter or make_restarter(self.config)
        self.journal = journal or Journal.of(self.config)
        home = self.config.state_path
        self.history = RestartHistory(os.path.join(home, "restarts.json"))
        #: Redis restart lock and heartbeats, when MEMWARDEN_REDIS_URL is set.
        self.fleet = Fleet.from_config(self.config, env)
        if locks is None:
            locks = [HostLock(os.path.join(home, "lock"))]
            if self.fleet is not None:
                locks.append(self.fleet.lock)
        self.once = Once(*locks)
        self.policy = Policy(
            self.limits, started_at=time.time(), past_restarts=self.history.loops()
        )
        self._in_flight: dict[Any, dict[str, Any]] = {}
        self._mutex = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base: Sample | None = None  # last full reading, for the fast estimate
        self._exact_fast = isinstance(self.gauge, ProcessGauge)
        first = self.limits.soft if self.limits.soft is not None else self.limits.hard
        self._first_limit = first if first is not None else 1 << 62
        self.pace = Pace(self.config, first)
        self.last_sample: Sample | None = None
        #: True once a drain has overrun the shutdown timeout: the kill then takes the whole
        #: worker, whatever a ``kill`` hook could take instead.
        self.overrun = False
        self.last_culprit: str | None = None
        self.counts = {
            "jobs": 0,
            "reclaims": 0,
            "freed": 0,
            "restarts": 0,
            "kills": 0,
            "oom_kills": 0,
        }
        self._said_off = False
        #: Intake paused by us (:attr:`Hooks.pause`), and when the restart cap was last said.
        self.paused = False
        self._capped_said_at = self._deferred_said_at = -SAY_AGAIN_AFTER
        self._deferred_at = -SIBLING_SETTLE_MAX
        self._deferred_total = 0
        #: tracemalloc around a few runs of one kind (MEMWARDEN_TRACE), and the metrics.
        self.tracer = (
            Tracer(self.config.trace, self.config.trace_runs, home, self.journal.write)
            if self.config.trace
            else None
        )
        self.metrics: Any = None
        self.live = LiveFigures(self.config.live_memory)
        #: The kernel's OOM kills in our cgroup, looked at start and about once a second.
        self.oom = OomWatch(cgroup, home) if cgroup is not None else None
        self._oom_looked_at = 0.0
        #: Memory pressure (PSI) and the cgroup's memory events, for samples and metrics.
        self.signals = Signals(cgroup)
        self._at_start()

    @swallow
    def _at_start(self) -> None:
        """The start-up reading: a process that starts over its soft limit is told loudly."""
        self._look_for_oom_kills(at_start=True)
        if self.enabled:
            self._respond(self.policy.at_start(self.read().total))

    def _look_for_oom_kills(self, at_start: bool = False) -> None:
        """Say (journal and log) each OOM kill the kernel made in our cgroup."""
        if self.oom is None:
            return
        self._oom_looked_at = time.monotonic()
        kills = self.oom.new_kills()
        if not kills:
            return
        self.counts["oom_kills"] += kills
        self.journal.write(
            "oom_kill",
            kills=kills,
            oom_kills=self.oom.seen,
            cgroup=self.oom.cgroup.path,
            limit=self.quota.limit,
            before_start=at_start,
        )
        log.error(
            "memwarden: the kernel OOM-killed %d process(es) in this cgroup%s: the ladder "
            "acted too late. Lower MEMWARDEN_SOFT_LIMIT / MEMWARDEN_HARD_LIMIT, or see "
            "`memwarden diagnose`.",
            kills,
            " before this worker started" if at_start else "",
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Warden:
        return cls(env=env, **overrides)

    def __repr__(self) -> str:
        return (
            f"Warden(gauge={self.gauge.source}, soft={format_size(self.limits.soft)}, "
            f"hard={format_size(self.limits.hard)}, restart={self.restarter.name})"
        )

    @property
    def enabled(self) -> bool:
        return self.limits.enabled

    # ----------------------------------------------------------------- the contract
    @property
    def state(self) -> WardenState:
        """What an integration may read (:class:`~memwarden.hooks.WardenState`)."""
        policy = self.policy
        return WardenState(
            limits=self.limits,
            quota=self.quota.limit,
            sample=self.last_sample,
            overrun=self.overrun,
            restarting=policy.restarting,
            paused=self.paused,
            killed=policy.killed,
        )

    def attach(self, hooks: Hooks) -> None:
        """Take an integration's hooks, for a warden the user built (before :meth:`start`)."""
        self.hooks = hooks

    def being_stopped(self) -> None:
        """The framework is stopping this worker on its own: no restart of ours from now."""
        self.policy.restarting = True

    def recovered(self) -> None:
        """A hard kill took only a pool child (or a work horse): this worker lives on."""
        self.policy.did_recover()

    @swallow
    def record_job(self, record: dict[str, Any]) -> None:
        """A job measured in another process (RQ's work horse): count it, journal it."""
        self.counts["jobs"] += 1
        if record.get("rss_after", 0) > record.get("rss_before", 0):
            self.last_culprit = record.get("job")
        self.journal.write("job", **record)

    def quarantined(
        self,
        job: str | None,
        job_id: str,
        kills: int,
        *,
        where: str | None = None,
        reason: str | None = None,
        queue: str | None = None,
    ) -> None:
        """The integration set ``job`` aside as poison (running at ``kills`` hard kills, in
        ``where``): one ``quarantine`` record, one error line. Not guarded: it is called
        from inside the integration's own hook boundary."""
        optional = {"framework": self.framework, "queue": queue, "reason": reason, "where": where}
        given = {k: v for k, v in optional.items() if v is not None}
        self.journal.write("quarantine", job=job, job_id=job_id, kills=kills, **given)
        log.error(
            "memwarden: %s job %s[%s] was running at %d hard kills: quarantined%s",
            self.framework or "a",
            job,
            job_id,
            kills,
            f" in {where}" if where else "",
        )

    # ----------------------------------------------------------------- job hooks
    @swallow
    def job_started(self, job: str, job_id: Any = None, **extra: Any) -> None:
        key = job_id if job_id is not None else threading.get_ident()
        if self.tracer is not None:
            self._trace_started(job, key)
        live = self._live("_before")
        with self._mutex:
            self._in_flight[key] = {
                "job": job,
                "job_id": job_id,
                "t0": time.perf_counter(),
                "rss_before": self_rss(),
                **live,
                **extra,
            }

    @swallow
    def job_finished(self, job_id: Any = None, **extra: Any) -> Decision | None:
        key = job_id if job_id is not None else threading.get_ident()
        with self._mutex:
            started = self._in_flight.pop(key, None)
        rss_after = self_rss()
        if started is not None:
            record = {
                "job": started.pop("job"),
                "job_id": started.pop("job_id"),
                "rss_before": started.pop("rss_before"),
                "rss_after": rss_after,
                "duration_s": round(time.perf_counter() - started.pop("t0"), 6),
                **(self._live("") if "blocks_before" in started else {}),
            }
            self.live.job_done(record["duration_s"])
            if self.framework:
                record["framework"] = self.framework
            record.update(started)
            record.update(extra)
            self.counts["jobs"] += 1
            if rss_after - record["rss_before"] > 0:
                self.last_culprit = record["job"]
            self.journal.write("job", **record)
            if self.tracer is not None:
                self._trace_finished(record, key)
        return self._check(fast_rss=rss_after)

    def _live(self, suffix: str) -> dict[str, int]:
        """Live-memory figures for a job record (MEMWARDEN_LIVE_MEMORY, within a budget)."""
        return {k + suffix: v for k, v in self.live.read().items()}

    @swallow
    def _trace_started(self, job: str, key: Any) -> None:
        assert self.tracer is not None
        self.tracer.job_started(job, key)

    @swallow
    def _trace_finished(self, record: dict[str, Any], key: Any) -> None:
        assert self.tracer is not None
        self.tracer.job_finished(record, key)

    @contextlib.contextmanager
    def job(self, name: str, job_id: Any = None, **extra: Any) -> Iterator[None]:
        """``with warden.job("send_email", job_id):`` around one job."""
        self.job_started(name, job_id, **extra)
        try:
            yield
        finally:
            self.job_finished(job_id)

    def in_flight(self) -> list[dict[str, Any]]:
        if self.hooks.in_flight is not None:
            with contextlib.suppress(Exception):
                return list(self.hooks.in_flight())
        with self._mutex:
            return [{"job": v["job"], "job_id": v["job_id"]} for v in self._in_flight.values()]

    # ----------------------------------------------------------------- checking
    def read(self) -> Sample:
        """A full reading from the configured gauge (also resets the fast estimate)."""
        sample = self.pace.timed(self.gauge.read)
        self._base = sample
        self.last_sample = sample
        return sample

    def estimate(self, rss_now: int) -> int | None:
        """The gauge's figure moved by our own RSS change since the last full reading."""
        if self._exact_fast:
            return rss_now
        base = self._base
        return None if base is None else base.total + (rss_now - base.rss)

    @swallow
    def check(self) -> Decision | None:
        """Read the gauge, decide and respond (the hard limit judged on this reading: only
        the watchdog projects a rise). Returns the decision (None when off)."""
        return self._check(fast_rss=None)

    def _check(self, fast_rss: int | None) -> Decision | None:
        if not self.enabled:
            if not self._said_off:
                self._said_off = True
                log.warning(
                    "memwarden: no quota and no limit found: the guard is off "
                    "(set MEMWARDEN_SOFT_LIMIT or MEMWARDEN_QUOTA)"
                )
            return None
        if fast_rss is not None:  # the per-job fast path: no full read while well under
            total = self.estimate(fast_rss)
            if total is not None and total < self._first_limit:
                if self.policy.over_since is not None or self.policy.paused:
                    # the episode may be over, or paused intake may resume (or restart)
                    busy = self._busy(total)
                    return self._respond(self._observe(total, time.time(), busy=busy))
                return UNDER
        total = self.read().total
        # Only the watchdog projects, over the lookahead it set for its own next reading: a
        # reading at a job's end comes when that job's growth is over, and readings of job
        # ends a few ms apart in a threads pool make a burst look like GiB/s.
        decision = self._observe(total, time.time(), project=False, busy=self._busy(total))
        return self._respond(decision)

    def _observe(self, total: int, now: float, **kw: Any) -> Decision:
        """The policy's decision, with a restart held while :attr:`Hooks.holds_elsewhere`
        says the memory over the soft limit ends with its job (intake stays paused)."""
        decision = self.policy.observe(total, now, **kw)
        held = self.hooks.holds_elsewhere
        if decision.action is Action.RESTART and held is not None and held(total):
            why = f"{decision.reason}; the memory is held elsewhere: it ends with its job"
            return Decision(
                Action.WAIT, why, decision.total, decision.limit, cause=Cause.HELD_ELSEWHERE
            )
        return decision

    def _busy(self, total: int) -> bool | None:
        """Whether a job is in hand, asked only over the soft limit or while intake is
        paused (None otherwise)."""
        soft = self.limits.soft
        if soft is None or (total < soft and not self.policy.paused):
            return None
        return bool(self.in_flight())

    def _respond(self, decision: Decision) -> Decision:
        if decision.alarm:
            log.error(
                "memwarden: this process starts at %s, over its soft limit %s: restarts "
                "cannot bring it under. Raise the limit or cut start-up memory.",
                format_size(decision.total),
                format_size(decision.limit),
            )
        action = decision.action
        if action is Action.RECLAIM:
            return self._reclaim_rung(decision)
        self._steer_intake(decision)
        if action is Action.RECYCLE_CHILD:
            self.policy.did_recycle()
            if self.config.dry_run:
                self._record("restart", decision, action="recycle", dry_run=True)
            elif self.hooks.recycle is not None and self.hooks.recycle(decision.reason):
                self._record("restart", decision, action="recycle")
        elif action is Action.RESTART:
            self._restart(decision)
        elif action is Action.KILL:
            self._kill(decision)
        elif decision.capped and time.monotonic() - self._capped_said_at >= SAY_AGAIN_AFTER:
            self._capped_said_at = time.monotonic()
            log.error("memwarden: %s", decision.reason)
        return decision

    def _steer_intake(self, decision: Decision) -> None:
        """Pause intake while the policy says so (over the soft limit), resume when it no
        longer does — never once a restart or kill is under way: a drain stays a drain."""
        want = self.policy.paused
        if want == self.paused or (not want and (self.policy.restarting or self.policy.killed)):
            return
        self.paused = want
        hook = self.hooks.pause if want else self.hooks.resume
        if hook is None:  # nothing to pause here (a pool child): nothing to say
            return
        event = "pause" if want else "resume"
        self.journal.write(event, total=decision.total, limit=self.limits.soft)
        log.info(
            "memwarden: %s intake at %s (soft limit %s)",
            event,
            format_size(decision.total),
            format_size(self.limits.soft),
        )
        try:
            hook()
        except Exception:
            log.exception("memwarden: the %s hook failed", event)

    def _reclaim_rung(self, decision: Decision, decide: bool = True) -> Decision:
        """The first rung: this process's heap trimmed, the pool children asked to trim
        theirs (:attr:`Hooks.reclaim`), the ``reclaim`` journaled, and a fresh reading
        decided on (responded to, unless ``decide`` is False)."""
        now = time.time()
        self.policy.did_reclaim(now)
        if self.config.dry_run:
            self._record("reclaim", decision, freed=0, rss_after=self_rss(), dry_run=True)
            return decision
        got = reclaim_mod.reclaim(self_rss)
        asked = self._ask_children_to_reclaim(decision.reason)
        if asked:
            self.policy.did_ask(now + RECLAIM_SETTLE)
        after = self.read()
        self.policy.did_reclaim(now, after.total)
        self.counts["reclaims"] += 1
        self.counts["freed"] += got.freed
        self.journal.write(
            "reclaim",
            freed=got.freed,
            rss_before=got.before,
            rss_after=got.after,
            total_before=decision.total,
            total_after=after.total,
            trimmed=got.trimmed,
            seconds=round(got.seconds, 6),
            reason=decision.reason,
            **cause_field(decision.cause),
            **({"children_asked": asked} if asked else {}),
        )
        whole = (
            ""
            if self.gauge.source == "process"
            else (
                f"; {self.gauge.source} figure {format_size(decision.total)} -> "
                f"{format_size(after.total)}"
            )
        )
        log.info(
            "memwarden: reclaimed %s of this process's RSS (%s -> %s)%s",
            format_size(got.freed),
            format_size(got.before),
            format_size(got.after),
            whole,
        )
        busy = self._busy(after.total)
        after_decision = self._observe(after.total, time.time(), busy=busy)
        return self._respond(after_decision) if decide else after_decision

    def _ask_children_to_reclaim(self, reason: str) -> int:
        """How many pool children were asked to reclaim (0 without the hook)."""
        if self.hooks.reclaim is None:
            return 0
        try:
            return self.hooks.reclaim(reason)
        except Exception:  # the own reclaim still counts: no retry every reading
            log.exception("memwarden: asking the pool to reclaim failed")
            return 0

    @swallow
    def reclaim_now(
        self, reason: str, decide: bool = True, cause: Cause = Cause.ASKED
    ) -> Decision | None:
        """Reclaim at once, asked from outside (a pool child asked by its worker), then
        decide as after any reclaim — or, with ``decide=False``, leave what follows to the
        next check (where only that moment can act on it) and return what it would be."""
        if not self.enabled:
            return None
        total = self.read().total
        asked = Decision(Action.RECLAIM, reason, total, self.limits.soft, cause=cause)
        return self._reclaim_rung(asked, decide)

    def _record(
        self,
        event: str,
        decision: Decision,
        in_flight: list[dict[str, Any]] | None = None,
        **fields: Any,
    ) -> None:
        in_flight = self.in_flight() if in_flight is None else in_flight
        self.journal.write(
            event,
            reason=decision.reason,
            **cause_field(decision.cause),
            total=decision.total,
            limit=decision.limit,
            gauge=self.gauge.source,
            in_flight=in_flight,
            **fields,
        )
        kinds = ", ".join(f"{j.get('job')}[{j.get('job_id')}]" for j in in_flight) or "none"
        share = fields.get("action") == "recycle" and "share" in self.quota.source
        log.warning(
            "memwarden: %s: %s%s; in flight: %s",
            action_word(event, str(fields.get("action") or ""), bool(fields.get("dry_run"))),
            decision.reason,
            "; the soft limit here is this pool child's share" if share else "",
            kinds,
        )

    # ----------------------------------------------------------------- acting
    def _restart(self, decision: Decision) -> None:
        now = time.time()
        if self.config.dry_run:
            self.policy.did_dry_run(now)
            self._record("restart", decision, action=self.restarter.name, dry_run=True)
            return
        if not self.once.try_take():
            log.info("memwarden: restart wanted but another is under way; still serving")
            return
        self.policy.did_restart(now)
        self.counts["restarts"] += 1
        with contextlib.suppress(OSError):
            self.history.add(now, self.limits.restart_window, loops=self.policy.loops)
        self._record("restart", decision, action=self.restarter.name)
        threading.Thread(
            target=self._restart_sequence, args=(decision,), name="memwarden-restart", daemon=True
        ).start()

    @swallow
    def _restart_sequence(self, decision: Decision) -> None:
        timeout = self.config.shutdown_timeout
        deadline = time.monotonic() + timeout
        if self.paused and self.hooks.resume is not None:
            # Intake is paused already, and can resume: the jobs in hand end first, and if
            # memory is back under the soft limit then (a spike that went back down), the
            # restart is called off. Else the drain below makes it for good.
            self._wait_for_jobs_in_hand(deadline)
            if self._call_off():
                return
        if self.hooks.drain is not None:
            self.hooks.drain()
            self._wait_for_jobs_in_hand(deadline)
        if self.policy.killed:
            return
        self.restarter.restart(decision.reason)
        if self.restarter.name == "none":  # recorded only: someone outside acts
            return
        # Still here after the shutdown timeout: the graceful way did not end us.
        if not self._stop.wait(timeout) and not self.policy.killed:
            self.overrun = True
            self._kill(
                Decision(
                    Action.KILL,
                    f"still running {timeout:g}s after restart",
                    decision.total,
                    decision.limit,
                    cause=Cause.SHUTDOWN_OVERRUN,
                )
            )

    def _wait_for_jobs_in_hand(self, deadline: float) -> None:
        # A kill under way may take one pool child or work horse (then we recover and the
        # drain goes on: the worker waits for this restart) or the whole worker (then this
        # thread dies with it).
        while (self.policy.killed or self.in_flight()) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _call_off(self) -> bool:
        """With the jobs in hand done: well under the soft limit again, and not moments
        after the last call-off (:meth:`Policy.may_call_off`), the restart is called off
        (its lock given back) and intake resumes. True when it was."""
        soft = self.limits.soft
        if self.policy.killed or self.in_flight() or soft is None or self.policy.pressured:
            return False
        total, now = self.read().total, time.time()
        if not self.policy.may_call_off(total, now):
            return False
        # Said before the policy lets go: from then on another thread may resume intake.
        self.journal.write("restart_called_off", total=total, limit=soft)
        self.policy.did_call_off(now)
        self.once.give_back()
        self.counts["restarts"] -= 1
        log.warning(
            "memwarden: restart called off: %s, under the soft limit %s once the jobs in hand "
            "were done",
            format_size(total),
            format_size(soft),
        )
        self._respond(self._observe(total, time.time()))  # resumes intake
        return True

    def _kill(self, decision: Decision) -> None:
        if self._a_sibling_holds_it(decision):
            return
        # The job path and the watchdog may both decide KILL: the first one acts. The jobs
        # in flight are those started and not finished at this instant (job hooks take the
        # same lock): one that ends a moment later still dies, one that starts later does
        # not count.
        with self._mutex:
            if self.policy.killed:
                return
            self.policy.did_kill()
            in_flight = self.in_flight()
        if self.config.dry_run:
            self._record("kill", decision, in_flight, dry_run=True)
            return
        self.counts["kills"] += 1
        fields: dict[str, Any] = {}
        if self.hooks.before_kill is not None:
            try:
                fields = self.hooks.before_kill(in_flight) or {}
            except Exception:
                log.exception("memwarden: before_kill hook failed; killing anyway")
        # One list for the hook, the record and the log line (a hook may narrow it to the
        # jobs that really die: those of the one child it kills).
        self._record("kill", decision, fields.pop("in_flight", in_flight), **fields)
        self.journal.close()
        if self.hooks.kill is not None:
            self.hooks.kill()
            return
        kill_tree_and_self()

    def _a_sibling_holds_it(self, decision: Decision) -> bool:
        """Under a cgroup figure shared by sibling worker processes (Dramatiq's, Huey's),
        the hard limit is everybody's: a process with no job in hand that is not the largest
        in the cgroup leaves the kill to a larger one that runs a warden — its warden takes
        it a moment later. Killing the smaller one would free less and still leave the
        grower to be killed."""
        cgroup = self.oom.cgroup if self.oom is not None else None
        if cgroup is None or self.gauge.source != "cgroup" or self.hooks.kill is not None:
            return False
        if self.overrun:
            return False
        if self.in_flight():
            return False
        mine = set(process_tree(os.getpid()))
        try:
            with open(os.path.join(cgroup.path, "cgroup.procs")) as f:
                others = [int(p) for p in f.read().split() if int(p) not in mine]
        except (OSError, ValueError):
            return False
        own = sum(rss(p) for p in mine)
        # Only a process that runs a warden takes the kill: one that runs none (a consumer's
        # main process, its scheduler) would leave it to the kernel's OOM killer. One being
        # killed (its warden's kill, seen before its memory is given back: its threads and
        # its RSS may be gone already) frees memory: wait for it as for a kill taken.
        larger = [p for p in others if (rss(p) > own and runs_warden(p)) or being_killed(p)]
        now, was = time.monotonic(), self._deferred_total
        self._deferred_total = decision.total
        if larger:
            self._deferred_at = now
        elif now - self._deferred_at < SIBLING_SETTLE:
            return True  # the larger one was just killed: its memory is still being freed
        elif now - self._deferred_at < SIBLING_SETTLE_MAX and decision.total <= was:
            return True  # and it still is: memory is not rising
        if larger and time.monotonic() - self._deferred_said_at >= SAY_AGAIN_AFTER:
            self._deferred_said_at = time.monotonic()
            log.warning(
                "memwarden: %s; no job in hand here and process %d is larger (%s > %s): "
                "the kill is its to take",
                decision.reason,
                larger[0],
                format_size(rss(larger[0])),
                format_size(own),
            )
        return bool(larger) or self._fell_as_it_looked(decision)

    def _fell_as_it_looked(self, decision: Decision) -> bool:
        """No larger sibling now — but one may have been at the reading: killed by its own
        warden, gone and its memory given back between that reading and our look (a busy
        machine puts any time between the two). Killing ourselves, no job in hand, would
        free nothing of what crossed the limit. A fresh reading judges: back under the
        limit and lower than the decided one, the kill is not ours (the next reading decides
        afresh); still over, or rising, it is taken now."""
        limit = decision.limit
        fresh = self.read().total
        if limit is None or fresh >= limit or fresh >= decision.total:
            return False
        log.info(
            "memwarden: %s; no job in hand here, and memory fell to %s as we looked (a "
            "sibling's given back): not killed",
            decision.reason,
            format_size(fresh),
        )
        return True

    # ----------------------------------------------------------------- watchdog
    def start(self) -> Warden:
        """Start the watchdog thread (idempotent). Returns self."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._watch, name="memwarden", daemon=True)
            self._thread.start()
        if self.config.metrics_port is not None and self.metrics is None:
            from memwarden.metrics import serve

            self.metrics = serve(self, self.config.metrics_port, self.config.metrics_addr)
        if self.fleet is not None:
            self.fleet.start(self)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.fleet is not None:
            self.fleet.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def close(self) -> None:
        """Stop the watchdog, give back any restart lock, close the journal."""
        self.stop()
        self.once.give_back()
        self.journal.close()

    def _watch(self) -> None:
        if self.limits.hard is not None and not self.config.dry_run:
            name_this_thread()  # siblings may leave a hard kill to us (runs_warden)
        while not self._stop.is_set():
            self.watch_once()
            self._stop.wait(self.watch_interval())

    def watch_interval(self) -> float:
        """Seconds to the next reading after the last one: ``interval``, or
        ``alert_interval`` while it was over the soft limit (near the quota a fast-growing
        job must be seen before it crosses the hard limit). Both stretch where readings are
        dear (a tree of many processes by PSS) so that they never take more than
        ``READ_BUDGET`` of a core."""
        last = self.last_sample
        total = last.total if last is not None else 0
        return self.pace.interval_after(total, self.policy.rise, urgent=self.policy.look_soon)

    @swallow
    def watch_once(self) -> Decision | None:
        """One watchdog tick: a full reading, a decision, and a ``sample`` record (at most
        one per ``SAMPLE_EVERY``, and whenever it acts)."""
        if not self.enabled:
            return self._check(fast_rss=None)
        sample = self.read()
        # The policy judges the hard limit on where memory will be at the next reading.
        self.policy.lookahead = self.pace.interval_after(sample.total, self.policy.rise)
        busy = self._busy(sample.total)
        psi = self.signals.full10() if self.limits.pressure_full is not None else None
        decision = self._respond(self._observe(sample.total, time.time(), busy=busy, pressure=psi))
        if time.monotonic() - self._oom_looked_at >= SAMPLE_EVERY:
            self._look_for_oom_kills()
        if self.pace.record_due(quiet=decision.action in (Action.OK, Action.WAIT)):
            self.journal.write(
                "sample",
                rss=sample.rss,
                total=sample.total,
                limit=self.limits.soft,
                hard=self.limits.hard,
                gauge=sample.source,
                **self.signals.journal_fields(),
            )
        return decision


def kill_tree_and_self() -> None:
    """SIGKILL our descendants, then ourselves (never the process group: it may hold our
    parent's shell or test runner)."""
    me = os.getpid()
    stack, seen = [me], []
    while stack:
        pid = stack.pop()
        for kid in children_of(pid):
            if kid not in seen:
                seen.append(kid)
                stack.append(kid)
    for pid in seen:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    sys.stderr.flush()
    os.kill(me, signal.SIGKILL)
