"""Gunicorn: workers recycled on memory from the arbiter, without a failed request.

In ``gunicorn.conf.py``::

    from memwarden.gunicorn import hooks

    globals().update(hooks(soft_limit="85%", journal="/var/log/memwarden.jsonl"))

A watchdog thread in the arbiter (started by ``when_ready``) reads the memory cgroup (the
platform's figure) and each worker's own memory (USS from ``smaps_rollup``: shared
copy-on-write pages are not counted once per worker). Over the soft limit it climbs:

1. reclaim: ``gc.collect()`` + ``malloc_trim`` in every worker between two requests
   (``post_request``; a thread in workers that run no request hooks, Uvicorn's);
2. recycle: SIGTERM to the worker with the most private memory, gunicorn's graceful worker
   exit (it finishes its requests in hand, the arbiter forks a fresh one, the others keep
   serving) — one at a time, a second only when memory is past halfway to the hard limit;
3. the whole server (SIGHUP: every worker replaced gracefully) when the episode outlasts
   the grace although every worker has been recycled in it;
4. at the hard limit, SIGKILL to the worker with the most private memory.

Sync, gthread and ``uvicorn_worker.UvicornWorker`` workers. A Uvicorn worker on its way out
first serves the connections it accepted just before (Uvicorn alone closes them unread).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import mmap
import os
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Unpack

from memwarden import reclaim as reclaim_mod
from memwarden.config import Config, Options
from memwarden.events import Cause
from memwarden.gauges import Gauge, Sample, self_rss, smaps_rollup
from memwarden.journal import Journal
from memwarden.oom import OomWatch
from memwarden.policy import Limits
from memwarden.setup import set_up
from memwarden.units import SettingError, format_size

log = logging.getLogger("memwarden")

#: Seconds the workers' reclaims have to show in the cgroup before a recycle.
RECLAIM_SETTLE = 0.5
#: Seconds after a hard kill before another: the killed worker's pages are being uncharged.
KILL_SETTLE = 1.0
#: Seconds after a recycle before a second one may run beside it (memory demanding it).
SECOND_RECYCLE_AFTER = 1.0
#: How often a worker with no request hooks looks for a reclaim asked of it (s).
ASK_POLL = 0.1
#: Worker classes that call ``post_request`` (the others' workers poll for asks).
HOOKED_WORKERS = ("gunicorn.workers.sync", "gunicorn.workers.gthread")
#: Seconds after which a worker a dry run would have stopped counts as gone (none is).
DRY_RUN_EXIT = 1.0
#: Seconds a Uvicorn worker on its way out waits for the request of a connection it accepted
#: just before (most come within a millisecond of the connect).
NEW_CONNECTION_WAIT = 2.0


def serve_accepted_connections() -> None:
    """Mend Uvicorn's graceful stop in this process: it closes every connection with no
    request parsed yet in the same step as it stops listening, so a connection accepted a
    moment before — its request in the socket, unread — is reset (uvicorn discussion #2315,
    issue #2757). Stop listening first, let those requests arrive (up to
    ``NEW_CONNECTION_WAIT``), then Uvicorn's own stop serves them with keep-alive off."""
    try:
        from uvicorn.server import Server
    except ImportError:
        return
    original = Server.shutdown
    if getattr(original, "memwarden", False):
        return

    async def shutdown(self: Any, sockets: Any = None) -> None:
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + NEW_CONNECTION_WAIT
        while time.monotonic() < deadline and any(
            getattr(c, "cycle", True) is None for c in self.server_state.connections
        ):
            await asyncio.sleep(0.01)
        await original(self, sockets)

    shutdown.memwarden = True  # type: ignore[attr-defined]
    Server.shutdown = shutdown  # type: ignore[method-assign]


class Asks:
    """A counter in shared memory, made in the arbiter before it forks its workers: the
    arbiter bumps it to ask every worker to reclaim; a worker reclaims when it moved."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, 8)

    def bump(self) -> None:
        self._map[:8] = struct.pack("Q", self.value() + 1)

    def value(self) -> int:
        return int(struct.unpack("Q", self._map[:8])[0])


@dataclass
class Episode:
    """One stretch over the soft limit."""

    since: float
    reclaimed_at: float | None = None
    #: The workers there when it began: each is recycled at most once in it (their
    #: replacements are fresh), largest first.
    first: set[int] = field(default_factory=set)
    recycled: set[int] = field(default_factory=set)


class GunicornGuard:
    """The arbiter's watchdog and the workers' reclaim, as gunicorn server hooks."""

    def __init__(self, **options: Unpack[Options]) -> None:
        self.options = options
        self.config: Config | None = None
        self.limits: Limits | None = None
        self.gauge: Gauge | None = None
        self.quota: int | None = None
        self.journal = Journal(None)
        self.oom: OomWatch | None = None
        self.asks = Asks()
        self.server: Any = None
        self.seen_asks = 0
        #: Workers sent SIGTERM (pid → when) and SIGKILL (pid → when), until reaped.
        self.recycling: dict[int, float] = {}
        self.killing: dict[int, float] = {}
        self.episode: Episode | None = None
        #: When the whole server was restarted (SIGHUP), within the restart window.
        self.hups: list[float] = []
        self.counts = {"reclaims": 0, "recycles": 0, "kills": 0, "server_restarts": 0}
        self.last_sample: Sample | None = None
        self.read_at = 0.0
        #: Bytes per second between the last two readings.
        self.rate = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._said_off = False
        self._log_handlers: list[logging.Handler] = []
        os.register_at_fork(after_in_child=self._after_fork)

    # ----------------------------------------------------------------- server hooks
    def hooks(self) -> dict[str, Callable[..., None]]:
        """The server hooks for ``gunicorn.conf.py`` (``globals().update(...)``)."""
        return {
            "when_ready": self.when_ready,
            "pre_fork": self.pre_fork,
            "post_fork": self.post_fork,
            "post_request": self.post_request,
            "child_exit": self.child_exit,
            "on_exit": self.on_exit,
        }

    def configure(self, options: Options) -> None:
        """Settings → quota, gauge, limits, journal: when gunicorn reads its config (at start,
        and again on SIGHUP when they changed). A bad setting stops gunicorn there, with the
        setting named and no traceback."""
        if self.config is not None and options == self.options:
            return
        again, self.options = self.config is not None, options
        try:
            config = Config.from_env(os.environ, **dict(options))
            where = set_up(config, can_recycle=True)
        except SettingError as exc:
            raise SystemExit(f"memwarden: {exc}") from None
        self.config, self.limits, self.gauge = config, where.limits, where.gauge(config)
        self.quota = where.quota.limit
        if self.journal.path != config.journal:
            self.journal = Journal.of(config)
        if where.cgroup is not None:
            self.oom = OomWatch(where.cgroup, config.state_path)
            self.oom.new_kills()
        if again and self.limits.enabled:
            log.warning(
                "memwarden: settings changed: workers recycled over %s, one killed at %s",
                format_size(self.limits.soft),
                format_size(self.limits.hard),
            )

    def when_ready(self, server: Any) -> None:
        """In the arbiter, before the first workers: start the watchdog."""
        self.start(server)

    def pre_fork(self, server: Any, worker: Any) -> None:
        """In the arbiter, before each fork: its objects out of every later collection
        (``gc.freeze``), so that no collection — the arbiter's reclaim, a worker's — copies
        the pages the workers share with it; and the watchdog started if a ``when_ready`` of
        the user's own took the place of ours."""
        gc.collect()
        gc.freeze()
        self.start(server)

    def start(self, server: Any) -> None:
        """Start the watchdog (once); memwarden's log lines go where gunicorn's go."""
        self.server = server
        self._log_with(server)
        if self._thread is not None and self._thread.is_alive():
            return
        if self.config is None:
            self.configure(self.options)
        if not self.limits or not self.limits.enabled:
            if not self._said_off:
                self._said_off = True
                log.warning(
                    "memwarden: no quota and no limit found: the gunicorn guard is off "
                    "(set MEMWARDEN_SOFT_LIMIT, e.g. 400MB, or run in a memory cgroup)"
                )
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="memwarden", daemon=True)
        self._thread.start()
        log.info(
            "memwarden: gunicorn workers recycled over %s, one killed at %s (%s gauge)%s",
            format_size(self.limits.soft),
            format_size(self.limits.hard),
            self.gauge.source if self.gauge else "-",
            " — DRY RUN" if self.dry_run else "",
        )

    def _log_with(self, server: Any) -> None:
        """No logging set up for memwarden (nor a root handler): gunicorn's error log's
        handlers and level, so ``--error-logfile`` and ``--log-level`` hold for ours too
        (its new ones after a SIGHUP)."""
        error_log = getattr(getattr(server, "log", None), "error_log", None)
        if error_log is None or list(error_log.handlers) == self._log_handlers:
            return
        if not self._log_handlers and (log.handlers or logging.getLogger().handlers):
            return  # the user's own logging
        for handler in self._log_handlers:
            log.removeHandler(handler)
        self._log_handlers = list(error_log.handlers)
        for handler in self._log_handlers:
            log.addHandler(handler)
        log.setLevel(error_log.level)
        log.propagate = False

    def post_fork(self, server: Any, worker: Any) -> None:
        """In a new worker: stop the arbiter's watchdog here (it did not survive the fork
        anyway); a worker class that runs no request hooks looks for asks in a thread."""
        if self._thread is None and self.limits is not None and self.limits.enabled:
            log.warning(
                "memwarden: the gunicorn watchdog is not running: gunicorn.conf.py has its "
                "own when_ready and pre_fork; call memwarden's from them (docs/gunicorn.md)"
            )
        self._thread = None
        self.seen_asks = self.asks.value()
        # Our own journal (and lock): the arbiter's watchdog may have held its lock as it forked.
        if self.config is not None:
            self.journal = Journal.of(self.config)
        if not any(c.__module__ in HOOKED_WORKERS for c in type(worker).__mro__):
            threading.Thread(target=self._poll_asks, name="memwarden", daemon=True).start()
        if any(c.__module__.startswith("uvicorn") for c in type(worker).__mro__):
            serve_accepted_connections()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def post_request(self, worker: Any, req: Any, environ: Any, resp: Any) -> None:
        """In a worker, between two requests: reclaim if the arbiter asked since the last."""
        self.between_requests()

    def child_exit(self, server: Any, worker: Any) -> None:
        """In the arbiter, a worker reaped: its recycle or kill is over."""
        with self._lock:
            self.recycling.pop(worker.pid, None)
            self.killing.pop(worker.pid, None)

    def on_exit(self, server: Any) -> None:
        """The arbiter stops: the watchdog too, the journal closed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.journal.close()

    # ----------------------------------------------------------------- in a worker
    def between_requests(self) -> None:
        """Reclaim once per ask (cheap when none came: one read of shared memory)."""
        asked = self.asks.value()
        if asked == self.seen_asks:
            return
        with self._lock:  # gthread's threads: one reclaim per ask
            if asked == self.seen_asks:
                return
            self.seen_asks = asked
        try:
            got = reclaim_mod.reclaim(self_rss)
            self.journal.write(
                "reclaim",
                reason="asked by the gunicorn arbiter",
                cause=Cause.ASKED.value,
                freed=got.freed,
                rss_before=got.before,
                rss_after=got.after,
                trimmed=got.trimmed,
                seconds=round(got.seconds, 6),
            )
        except Exception:
            log.exception("memwarden: reclaim in the worker failed (request unaffected)")

    def _poll_asks(self) -> None:
        while True:
            time.sleep(ASK_POLL)
            self.between_requests()

    # ----------------------------------------------------------------- the arbiter
    def _watch(self) -> None:
        assert self.config is not None
        while not self._stop.is_set():
            try:
                self.watch_once()
            except Exception:
                log.exception("memwarden: internal error in the gunicorn watchdog")
            over = self.episode is not None or self.recycling or self.killing
            self._stop.wait(self.config.alert_interval * 2 if over else self.config.interval)

    def workers(self) -> dict[int, int]:
        """The arbiter's workers: pid → USS in bytes (those gone left out)."""
        pids: list[int] = []
        for _ in range(3):  # the arbiter's main thread changes the dict as we copy it
            with contextlib.suppress(RuntimeError):
                pids = list(self.server.WORKERS)
                break
        now = time.monotonic()
        with self._lock:  # reaped (also without our child_exit hook): no longer under way
            for under_way in (self.recycling, self.killing):
                for pid, since in list(under_way.items()):
                    if pid not in pids or (self.dry_run and now - since >= DRY_RUN_EXIT):
                        del under_way[pid]
        uss = {}
        for pid in pids:
            mem = smaps_rollup(pid)
            if mem is not None:
                uss[pid] = mem.uss
        return uss

    def watch_once(self) -> None:
        """One reading and what it calls for; nothing while gunicorn stops (its workers are
        all on their way out: a recycle or a kill then only cuts their requests short)."""
        assert self.gauge is not None and self.limits is not None
        if self.server is not None and not getattr(self.server, "LISTENERS", True):
            self.episode = None
            return
        sample = self.gauge.read()
        now, total, lim = time.monotonic(), sample.total, self.limits
        if self.last_sample is not None and now > self.read_at:
            self.rate = (total - self.last_sample.total) / (now - self.read_at)
        self.last_sample, self.read_at = sample, now
        if self.oom is not None and (kills := self.oom.new_kills()):
            self.journal.write(
                "oom_kill",
                kills=kills,
                oom_kills=self.oom.seen,
                cgroup=self.oom.cgroup.path,
                limit=self.quota,
                total=total,
            )
        if lim.hard is not None and total >= lim.hard:
            self._hard(total, now)
        elif lim.soft is not None and total >= lim.soft:
            self._soft(total, now)
        else:
            self.episode = None

    def _hard(self, total: int, now: float) -> None:
        assert self.limits is not None
        if any(now - t < KILL_SETTLE for t in self.killing.values()):
            return
        workers = {p: u for p, u in self.workers().items() if p not in self.killing}
        if not workers:
            return
        pid = max(workers, key=workers.__getitem__)
        if self._signal(pid, signal.SIGKILL):
            self.killing[pid] = now
            self.counts["kills"] += 1
        reason = f"{format_size(total)} over hard limit {format_size(self.limits.hard)}"
        self._say(
            "kill",
            reason,
            total,
            self.limits.hard,
            Cause.OVER_HARD,
            target="child",
            child_pid=pid,
            uss=workers[pid],
        )

    def _soft(self, total: int, now: float) -> None:
        lim = self.limits
        assert lim is not None and lim.soft is not None
        ep = self.episode = self.episode or Episode(since=now)
        over = f"{format_size(total)} over soft limit {format_size(lim.soft)}"
        if lim.reclaim and ep.reclaimed_at is None:
            self._reclaim(ep, total, over, now)
            return
        settling = ep.reclaimed_at is not None and now - ep.reclaimed_at < RECLAIM_SETTLE
        if settling and not self._hard_within(total, RECLAIM_SETTLE):
            return
        workers = self.workers()
        if not ep.first:
            ep.first = set(workers)
        due = ep.first - ep.recycled - set(self.recycling)
        fresh = {p: u for p, u in workers.items() if p in due}
        if fresh and self._may_recycle(total, now):
            pid = max(fresh, key=fresh.__getitem__)
            if self._signal(pid, signal.SIGTERM):  # gunicorn's graceful worker exit
                self.recycling[pid] = now
                ep.recycled.add(pid)
                self.counts["recycles"] += 1
                self._say(
                    "restart",
                    over,
                    total,
                    lim.soft,
                    Cause.OVER_SOFT,
                    action="recycle",
                    child_pid=pid,
                    uss=fresh[pid],
                )
            return
        self._whole_server(ep, workers, total, over, now)

    def _hard_within(self, total: int, seconds: float) -> bool:
        """Memory rising fast enough to reach the hard limit within ``seconds``."""
        hard = self.limits.hard if self.limits else None
        return hard is not None and total + self.rate * seconds >= hard

    def _may_recycle(self, total: int, now: float) -> bool:
        """One recycle at a time; a second beside it only when memory demands it (past
        halfway from the soft to the hard limit, the first one a moment under way)."""
        lim = self.limits
        assert lim is not None and lim.soft is not None
        if not self.recycling:
            return True
        halfway = lim.soft + ((lim.hard or lim.soft) - lim.soft) // 2
        latest = max(self.recycling.values())
        demands = total >= halfway or self._hard_within(total, SECOND_RECYCLE_AFTER)
        return demands and now - latest >= SECOND_RECYCLE_AFTER

    def _reclaim(self, ep: Episode, total: int, over: str, now: float) -> None:
        ep.reclaimed_at = now
        self.counts["reclaims"] += 1
        if self.dry_run:
            rss = self_rss()
            self.journal.write(
                "reclaim", reason=over, cause=Cause.OVER_SOFT.value, freed=0, rss_before=rss,
                rss_after=rss, total_before=total, dry_run=True,
            )  # fmt: skip
            log.warning("memwarden: DRY RUN: would reclaim: %s", over)
            return
        self.asks.bump()
        got = reclaim_mod.reclaim(self_rss)
        self.journal.write(
            "reclaim",
            reason=over,
            cause=Cause.OVER_SOFT.value,
            freed=got.freed,
            rss_before=got.before,
            rss_after=got.after,
            total_before=total,
            trimmed=got.trimmed,
            seconds=round(got.seconds, 6),
            children_asked=len(self.workers()),
        )

    def _whole_server(
        self, ep: Episode, workers: dict[int, int], total: int, over: str, now: float
    ) -> None:
        """Every worker recycled in this episode, none under way, and still over past the
        grace: the memory is not the workers' to give back one by one — SIGHUP, at most
        once per ``min_uptime``, ``max_restarts`` per ``restart_window``; the workers that
        replace them are not recycled again in this episode."""
        lim = self.limits
        assert lim is not None
        if self.recycling or not workers or not ep.first <= ep.recycled:
            return
        if now - ep.since < lim.grace or (self.hups and now - self.hups[-1] < lim.min_uptime):
            return
        self.hups = [t for t in self.hups if now - t < lim.restart_window]
        if len(self.hups) >= lim.max_restarts:
            return  # capped, as restarts are: the hard limit still applies
        self.hups.append(now)
        self.counts["server_restarts"] += 1
        self._say("restart", over, total, lim.soft, Cause.GRACE_OVER, action="signal", signal="HUP")
        self._signal(os.getpid(), signal.SIGHUP)

    @property
    def dry_run(self) -> bool:
        """``dry_run``: decide, journal and log as ever, never signal nor reclaim."""
        return self.config is not None and self.config.dry_run

    def _signal(self, pid: int, sig: signal.Signals) -> bool:
        """Send ``sig`` to ``pid`` (in a dry run, pretend to); False when it is gone."""
        if self.dry_run:
            return True
        try:
            os.kill(pid, sig)
        except OSError:
            return False
        return True

    def _say(
        self, event: str, reason: str, total: int, limit: int | None, cause: Cause, **fields: Any
    ) -> None:
        self.journal.write(
            event,
            reason=reason,
            cause=cause.value,
            total=total,
            limit=limit,
            gauge=self.gauge.source if self.gauge else "cgroup",
            in_flight=[],
            **fields,
            **({"dry_run": True} if self.dry_run else {}),
        )
        what = fields.get("action") or event
        whom = fields.get("child_pid")
        log.warning(
            "memwarden: %s%s%s: %s",
            "DRY RUN: would " if self.dry_run else "",
            what,
            f" worker {whom}" if whom else " the server",
            reason,
        )


_guard: GunicornGuard | None = None


def hooks(**options: Unpack[Options]) -> dict[str, Callable[..., None]]:
    """The server hooks for ``gunicorn.conf.py``: ``globals().update(hooks(...))``.

    One guard per arbiter: gunicorn reads its config again on SIGHUP; settings changed there
    apply from then on, and the watchdog started at the first read goes on."""
    global _guard
    if _guard is None:
        _guard = GunicornGuard(**options)
    _guard.configure(options)
    return _guard.hooks()
