"""Celery: ``memwarden.celery.guard(app, **options)`` keeps a worker inside its quota.

Nothing happens in a process that only sends tasks: the wardens are built by the worker's
own signals.

- **Main process** (``worker_init``; watchdog from ``worker_ready``): the whole worker's
  figure (cgroup working set, else the PSS of its process tree). Over the soft limit:
  reclaim, then intake *pauses* (:class:`Intake`: the consumer stops fetching, and under
  threads/solo the tasks it holds but has not started go back to the broker; running ones
  go on) until memory is back under it; after the grace a *warm shutdown* (Celery stops
  consuming, lets the running tasks finish, closes its broker connection so what it holds
  goes back) and the restart action; for ``signal``/``exit`` the warm shutdown is the
  restart (the process exits, with ``exit_code`` for ``exit``, and its supervisor starts
  it again). At the hard limit (or on course to cross it before the next reading) a
  prefork worker loses only its largest pool child when that alone brings it under: that
  child's task is counted as a poison candidate and rejected back to the queue, billiard
  forks a new child, the worker serves on. Otherwise, and after the shutdown timeout: the
  tasks in flight are counted as poison candidates; under prefork the pool children are
  killed at once (their tasks are rejected back to the queue), a cold shutdown gets the
  broker connection closed, then SIGKILL. Where the task runs in the worker itself
  (threads, solo) every start and end of a task is frozen at the kill's instant, the tasks
  then running are the ones counted, the consumer takes nothing more, every message the
  worker holds goes back to its queue (Redis; RabbitMQ requeues them when the connection
  drops), then SIGKILL.
- **Prefork children** (``worker_process_init``): a ``job`` record per task from
  ``task_prerun``/``task_postrun``; after each task a child whose USS is over its share
  reclaims, then recycles by Celery's own ``worker_max_memory_per_child`` path — billiard's
  after-task memory check, answered with current USS instead of ``ru_maxrss`` (a peak
  that a freshly forked child inherits, so it would recycle after every task).
- **threads / solo pools**: tasks run in the main process, whose warden writes the
  records; a task has started at ``task_prerun`` and finished once Celery has stored its
  outcome (``task_success``/``task_failure``/``task_retry``, else ``task_postrun``).

A task redelivered after ``poison_kills`` hard kills is not run: it is marked FAILED with
:class:`PoisonJobError`, acknowledged, journaled (``quarantine``) and logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Unpack

import billiard.pool
from billiard.exceptions import SoftTimeLimitExceeded, Terminated, TimeLimitExceeded
from celery import Celery, bootsteps, signals
from celery.concurrency import get_implementation
from celery.concurrency.base import apply_target
from celery.concurrency.thread import ApplyResult
from celery.worker import state as worker_state

from memwarden.config import Config, Options
from memwarden.gauges import Sample
from memwarden.gauges.proc import (
    alive,
    children_of,
    process_tree,
    self_rss,
    smaps_rollup,
    stat_fields,
)
from memwarden.gauges.quota import Quota, detect_platform
from memwarden.hooks import Hooks
from memwarden.poison import PoisonJobs
from memwarden.reclaim import ReclaimRequests, ask_to_reclaim
from memwarden.restart import NoRestart, Restarter, make_restarter
from memwarden.restart.exit import ExitRestarter
from memwarden.units import format_size
from memwarden.warden import Warden, kill_tree_and_self, swallow_but

#: Celery's (billiard's) control flow from its signal handlers: a soft time limit, a hard
#: one, a revoke's terminate. Raised into whatever runs, our hooks too: it passes through.
HOST_CONTROL_FLOW: tuple[type[BaseException], ...] = (
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    Terminated,
)
_hook_guard = swallow_but(*HOST_CONTROL_FLOW)

log = logging.getLogger("memwarden")

__all__ = [
    "CeleryGuard",
    "PoisonJobError",
    "UssGauge",
    "check_app",
    "guard",
    "no_loss_problems",
]

#: A child never restarts the worker: its soft layer ends at "recycle after this task".
NEVER = 365 * 24 * 3600.0  # the longest duration a setting takes
#: Longest wait for the cold shutdown to close the broker connection before SIGKILL.
COLD_STOP_WAIT = 10.0
#: Longest wait for a pool child killed at the hard limit to give its memory back.
CHILD_EXIT_WAIT = 2.0
#: Event-loop wake-up period (celery#6941; also how soon the loop acts on a pause).
WAKE_EVERY = 0.1
#: Longest wait (s), at a drain or a kill, for the consumer's pending Redis fetch to be
#: ended and read (a few ms while the event loop runs; it is not waited for once stopped).
FETCH_SETTLE = 0.5


class PoisonJobError(Exception):
    """A task that was running at ``poison_kills`` hard kills of its worker: quarantined."""


class UssGauge:
    """This process's USS (private pages): what a pool child alone would give back."""

    source = "uss"

    def read(self) -> Sample:
        mem = smaps_rollup(os.getpid())
        own = self_rss()
        return Sample(time.time(), mem.uss if mem is not None else own, own, "uss")


class AfterWarmShutdown:
    """The restart action after Celery's warm shutdown, which itself ends the process.

    - ``signal``: nothing more (the warm shutdown is what SIGTERM would do).
    - exits (``exit``, ``systemd``, ``kubernetes`` without pod deletion): at the very end of
      the warm shutdown (``worker_shutdown``), once the broker connection is closed cleanly,
      so the exit status is theirs and no prefetched message is left to a timeout.
    - platform APIs (``heroku``, pod deletion): once — from the warden when nothing is in
      flight, or from ``worker_shutdown`` if the worker gets there first, which then waits
      for the call to finish before exiting."""

    def __init__(self, inner: Restarter) -> None:
        self.inner = inner
        self.name = inner.name
        self.exits = isinstance(inner, ExitRestarter)
        self._lock = threading.Lock()
        self._done = False

    def restart(self, reason: str, at_shutdown: bool = False) -> None:
        if self.inner.name == "signal" or (self.exits and not at_shutdown):
            return
        with self._lock:
            if self._done:
                return
            self._done = True
            self.inner.restart(reason)


OPEN, PAUSED, CLOSED = "open", "paused", "closed"


class Intake:
    """The gate between Celery's consumer and its pool, in the worker's main process.

    ``open``: tasks are fetched and started. ``paused`` (memory over the soft limit): the
    consumer fetches nothing, a task handed to the pool but not started goes back to the
    broker instead of starting (threads, solo: prefork's pool keeps what it was handed),
    running tasks go on. ``closed`` (a drain or a kill): the same, for good.

    Under threads/solo it also knows the tasks running: started at ``task_prerun``, finished
    once Celery has stored their outcome. Every start and end passes :attr:`turnstile`; a
    kill takes it for good (:meth:`freeze`), so the tasks it counts are exactly those running
    at that instant, and none starts or ends after it. The consumer is touched only from
    its event loop's thread (:meth:`sync`, run soon after each change and every
    ``WAKE_EVERY``). On Redis the fetch stops at once: the channel sends no new ``BRPOP``
    while intake is not open, and a pending one is ended (``CLIENT UNBLOCK``).

    A broker reconnect gives Celery's consumer a new connection, channel and task consumer,
    which Celery starts consuming at once: :meth:`reattach` gates the new ones before it
    does, so a paused worker's new task consumer starts only once intake opens again."""

    def __init__(self) -> None:
        self.state = OPEN
        self.turnstile = threading.Lock()
        self.consumer: Any = None
        self.in_task = False  # solo: the event loop's thread is running a task
        self._mutex = threading.Lock()  # state, waiting, returns: held for moments only
        self._waiting: dict[int, Any] = {}  # id(request) -> request: handed over, unstarted
        self._returns: list[Any] = []  # requests to give back, from the loop's thread
        self._running: dict[Any, str] = {}  # task id -> name
        self._stopped: Any = None  # the task consumer we stopped, to start again
        self._synced_at = 0.0  # monotonic time of the last sync: the loop is alive
        self._redis: Any = None  # Redis broker: a client of our own, for CLIENT UNBLOCK
        self.channel: Any = None  # Redis broker: the consumer's channel
        self._fetcher: tuple[Any, int | None] | None = None  # fetching connection, client id
        self._loop_thread: int | None = None  # ident of the event loop's (consumer's) thread

    # ------------------------------------------------------------ wiring
    def attach(self, consumer: Any, pool: str, redis_client: Any = None) -> None:
        """Put the gate between ``consumer`` and its pool, and on the Redis broker
        (``redis_client``) between the channel and its fetch (at ``worker_ready``)."""
        self.consumer = consumer
        self._redis = redis_client
        self._loop_thread = threading.get_ident()
        self._restore_on_loop(consumer)
        self._gate_task_consumer(consumer.task_consumer)
        tasks_pool = consumer.pool
        if pool == "threads":
            tasks_pool.on_apply = self._threads_apply(tasks_pool.executor)
        elif pool == "solo":
            tasks_pool.on_apply = self._solo_apply
        else:  # prefork (or another pool): its own queue; only what comes in is gated
            tasks_pool.on_apply = self._gated_apply(tasks_pool.on_apply)

    def reattach(self, consumer: Any) -> None:
        """The consumer has started again (a broker reconnect; from its thread, before its
        event loop starts consuming): gate its new task consumer and channel. Nothing
        before the first :meth:`attach`."""
        if self.consumer is None:
            return
        self.consumer = consumer
        self._loop_thread = threading.get_ident()
        self._restore_on_loop(consumer)
        self._stopped = None  # the old task consumer is gone
        self._fetcher = None
        with self._mutex:
            # Handed to the pool before the loss, waiting for a slot: from the old channel,
            # which can acknowledge nothing; the broker delivers them again (it put back all
            # the old connection held). Run now, each would run twice.
            stale, self._waiting = len(self._waiting), {}
        self._gate_task_consumer(consumer.task_consumer)
        log.info("memwarden: broker reconnected; intake %s", self.state)
        if stale:
            log.info(
                "memwarden: %d task(s) from the lost connection not started: the "
                "broker delivers them again",
                stale,
            )

    def _restore_on_loop(self, consumer: Any) -> None:
        """Celery's prefetch restore after a reconnect runs on the event loop's thread.

        A consumer that reconnects while tasks run lowers its prefetch count, and raises it
        back as tasks are acknowledged: chained on each acknowledgement, so it runs in the
        thread that acknowledges, which under the threads pool is the task's own. The raise
        is an AMQP ``basic.qos`` call that waits for its reply by reading the connection's
        socket, which the event loop reads too: one reads the other's reply (the pool thread
        then blocks in ``recv``; the loop's next call, our pause's ``basic.cancel`` or
        resume's ``basic.consume``, waits for a reply already read) or half a frame (the
        reader left with the other half takes its bytes for a frame size and waits for
        them), and the worker fetches nothing until the broker drops the connection (30 s
        and more). Called off the loop's thread, the restore is handed to it."""
        name = "_restore_prefetch_count_after_connection_restart"
        restore = getattr(consumer, name, None)
        if restore is None or name in vars(consumer):
            return  # not this Celery, or handed over already

        def on_loop(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == self._loop_thread:
                return restore(*args, **kwargs)
            return consumer.call_soon(restore, *args, **kwargs)

        setattr(consumer, name, on_loop)

    def _gate_task_consumer(self, task_consumer: Any) -> None:
        """Gate a task consumer (and on Redis its channel's fetch)."""
        if task_consumer is None:
            return
        if self._redis is not None:
            with contextlib.suppress(AttributeError):
                self._gate_fetch(task_consumer.channel)
        self._gate_consume(task_consumer)

    def _gate_consume(self, task_consumer: Any) -> None:
        """Celery's event loop starts its task consumer at every (re)start: while intake is
        not open that start is put off until :meth:`sync` opens it (on RabbitMQ a start
        would have the broker push messages at once)."""
        consume = task_consumer.consume

        def gated(*args: Any, **kwargs: Any) -> Any:
            if self.state is OPEN:
                return consume(*args, **kwargs)
            self._stopped = task_consumer  # started by sync once intake is open
            return None

        task_consumer.consume = gated

    def _gate_fetch(self, channel: Any) -> None:
        """kombu's Redis channel asks ``qos.can_consume()`` before each ``BRPOP`` and before
        reading its socket: no new fetch while intake is not open, a pending one is read.
        Once the consumer is stopped (no queue active, so no fetch can start) the socket is
        read too: readable then, it was closed by the server, and left unread the event
        loop would spin on it and never reconnect."""
        self.channel = channel
        qos = channel.qos
        can_consume = qos.can_consume

        def gated() -> bool:
            fetching = (
                self.state is OPEN
                or bool(getattr(channel, "_in_poll", None))
                or not getattr(channel, "active_queues", True)
            )
            return fetching and bool(can_consume())

        qos.can_consume = gated

    def _threads_apply(self, executor: Any) -> Callable[..., Any]:
        """The threads pool's ``on_apply``: a task starts when a thread takes it, if still
        wanted then."""

        def on_apply(
            target: Any,
            args: Any = None,
            kwargs: Any = None,
            callback: Any = None,
            accept_callback: Any = None,
            **_: Any,
        ) -> Any:
            request = request_of(accept_callback)
            if not self._admit(request):
                return None
            run = (self._start, request, target, args, kwargs, callback, accept_callback)
            return ApplyResult(executor.submit(*run))

        return on_apply

    def _solo_apply(
        self,
        target: Any,
        args: Any = None,
        kwargs: Any = None,
        callback: Any = None,
        accept_callback: Any = None,
        **_: Any,
    ) -> None:
        """The solo pool's ``on_apply``: the task runs at once, in the loop's own thread."""
        request = request_of(accept_callback)
        if self._admit(request):
            self.in_task = True  # no fetch is pending while it runs
            try:
                self._start(request, target, args, kwargs, callback, accept_callback)
            finally:
                self.in_task = False

    def _gated_apply(self, handed: Callable[..., Any]) -> Callable[..., Any]:
        """Another pool's ``on_apply`` (prefork), given back what comes while not open."""

        def on_apply(target: Any, args: Any = None, kwargs: Any = None, **opts: Any) -> Any:
            request = request_of(opts.get("accept_callback"))
            if request is not None and self.state is not OPEN:
                self._give_back([request])
                self._free_slot()
                return None
            return handed(target, args, kwargs, **opts)

        return on_apply

    def _free_slot(self) -> None:
        """Prefork: Celery took a pool slot (its worker's semaphore) for a task before
        handing it to the pool, and frees it when the task's result comes back. A task given
        back never runs: its slot is freed here, or the pool is left one slot short for
        good (with all of them gone, the worker takes nothing ever again)."""
        controller = getattr(self.consumer, "controller", None)
        semaphore = getattr(controller, "semaphore", None)
        takes_slots = getattr(controller, "process_task", None) == getattr(
            controller, "_process_task_sem", None
        )
        if semaphore is not None and takes_slots:
            semaphore.release()  # may hand the slot to a waiting task (given back too)

    def _admit(self, request: Any) -> bool:
        """A task handed to the pool (loop thread): kept for its start, or given back."""
        if request is None:
            return True
        with self._mutex:
            if self.state is OPEN:
                self._waiting[id(request)] = request
                return True
        self._give_back([request])
        return False

    def _start(
        self,
        request: Any,
        target: Any,
        args: Any,
        kwargs: Any,
        callback: Any,
        accept_callback: Any,
    ) -> None:
        """Start a task the pool has a slot for — unless given back meanwhile, or intake is
        no longer open (then it goes back now)."""
        if request is not None:
            with self._mutex:
                held = self._waiting.pop(id(request), None)
                if held is None:
                    return  # given back already
                if self.state is not OPEN:
                    self._returns.append(held)
                    held = None
            if held is None:
                self._soon()
                return
        apply_target(target, args, kwargs, callback, accept_callback)

    def _give_back(self, requests: list[Any]) -> None:
        with self._mutex:
            self._returns.extend(requests)
        self._soon()

    def _soon(self) -> None:
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                self.consumer.call_soon(self.sync)

    # ------------------------------------------------------------ the warden's calls
    def pause(self) -> None:
        """Stop fetching; what the pool holds unstarted goes back to the broker."""
        self._shut(PAUSED)

    def resume(self) -> None:
        """Fetch again after :meth:`pause` (never after a drain or a kill)."""
        with self._mutex:
            if self.state is not PAUSED:
                return
            self.state = OPEN
        self._soon()

    def close(self) -> None:
        """For good (a drain, a kill): as :meth:`pause`, never resumed."""
        self._shut(CLOSED)

    def _shut(self, state: str) -> None:
        with self._mutex:
            if self.state is CLOSED or self.state == state:
                return
            self.state = state
            self._returns.extend(self._waiting.values())
            self._waiting.clear()
        self._soon()
        self._unblock()

    def _unblock(self) -> None:
        """End the channel's pending ``BRPOP``, if any (Redis)."""
        pending = getattr(self.channel, "_in_poll", None)
        if self._redis is None or pending is None:
            return
        known = self._fetcher
        client_id = known[1] if known is not None and known[0] is pending else None
        with contextlib.suppress(Exception):
            if client_id is None:
                client_id = redis_client_id(self._redis, pending)
            if client_id is not None:
                self._redis.client_unblock(client_id)

    def _know_fetcher(self) -> None:
        """Learn the Redis client id of the channel's fetching connection ahead of need
        (loop thread), so that a pause ends its ``BRPOP`` in one round trip."""
        pending = getattr(self.channel, "_in_poll", None)
        if self._redis is None or pending is None:
            return
        if self._fetcher is None or self._fetcher[0] is not pending:
            client_id = None  # not found (a proxy between): unblocked by a full lookup
            with contextlib.suppress(Exception):
                client_id = redis_client_id(self._redis, pending)
            self._fetcher = (pending, client_id)

    def settle(self, limit: float) -> bool:
        """Intake not open: wait (at most ``limit`` s, and only while the event loop runs)
        until the consumer has stopped and no fetch of its is pending — whatever a pending
        one brought is given back meanwhile. True once settled."""
        deadline = time.monotonic() + limit
        unblocked_at = time.monotonic()
        while not self.fetch_settled():
            now = time.monotonic()
            if now > deadline or now - self._synced_at > 3 * WAKE_EVERY:
                return False  # out of time, or the loop has stopped (a warm shutdown)
            if now - unblocked_at > 0.1:
                unblocked_at = now
                self._unblock()
            time.sleep(0.002)
        return True

    def freeze(self) -> list[dict[str, Any]]:
        """At a kill (threads, solo): intake closed, and no task starts or ends from now on
        (the turnstile is kept); returns the tasks running at this instant."""
        self.close()
        self.turnstile.acquire()
        return self.running()

    # ------------------------------------------------------------ tasks (threads, solo)
    def started(self, task_id: Any, name: str) -> None:
        with self.turnstile:
            self._running[task_id] = name

    def finished(self, task_id: Any) -> None:
        with self.turnstile:
            self._running.pop(task_id, None)

    def running(self) -> list[dict[str, Any]]:
        """The tasks started and not finished (threads, solo)."""
        for _ in range(5):
            with contextlib.suppress(RuntimeError):  # changed size: another thread
                return [{"job": n, "job_id": i} for i, n in list(self._running.items())]
        return []

    # ------------------------------------------------------------ the loop's thread
    def sync(self) -> None:
        """Bring the consumer in line with the state, and give back what is due (from the
        event loop's thread only: kombu's channels are not thread-safe)."""
        self._synced_at = time.monotonic()
        with self._mutex:
            returns, self._returns = self._returns, []
            state = self.state
        given = 0
        for request in returns:
            with contextlib.suppress(Exception):
                if not request.acknowledged:
                    request.reject(requeue=True)
                    given += 1
            worker_state.task_ready(request)
        if given:
            log.info("memwarden: %d task(s) not started went back to the queue", given)
        self._know_fetcher()
        task_consumer = getattr(self.consumer, "task_consumer", None)
        if task_consumer is None:
            return
        if state is not OPEN and consuming(task_consumer):
            task_consumer.cancel()
            self._stopped = task_consumer
        elif state is OPEN and self._stopped is task_consumer:
            self._stopped = None
            task_consumer.consume()

    def fetch_settled(self) -> bool:
        """True once the consumer has stopped and no fetch of its is pending (then nothing
        more can arrive). A task the loop's thread is running (solo) means no fetch is."""
        task_consumer = getattr(self.consumer, "task_consumer", None)
        if self.in_task:
            return True
        if task_consumer is not None and consuming(task_consumer):
            return False
        return not getattr(self.channel, "_in_poll", None)


def consuming(task_consumer: Any) -> bool:
    """Whether a kombu consumer is consuming from any of its queues."""
    return any(task_consumer.consuming_from(q) for q in task_consumer.queues)


def request_of(accept_callback: Any) -> Any:
    """The Celery request a pool is handed (its ``on_accepted`` method's owner), or None."""
    request = getattr(accept_callback, "__self__", None)
    return request if hasattr(request, "reject") and hasattr(request, "acknowledged") else None


def no_loss_problems(app: Celery) -> list[str]:
    """Settings that let a killed task vanish, each with its fix (empty: none)."""
    conf = app.conf
    problems = []
    if not conf.task_acks_late:
        problems.append(
            "task_acks_late is off: a task is acknowledged as it starts, so one running when "
            "the worker is killed is lost. Set task_acks_late = True"
        )
    if not conf.task_reject_on_worker_lost:
        problems.append(
            "task_reject_on_worker_lost is off: a task whose pool child is killed is marked "
            "FAILED instead of going back to the queue. Set task_reject_on_worker_lost = True"
        )
    for name, task in sorted(app.tasks.items()):
        if name.startswith("celery."):
            continue
        if conf.task_acks_late and task.__class__.__dict__.get("acks_late") is False:
            problems.append(f"task {name} sets acks_late=False: it is lost if killed")
        if conf.task_reject_on_worker_lost and (
            task.__class__.__dict__.get("reject_on_worker_lost") is False
        ):
            problems.append(f"task {name} sets reject_on_worker_lost=False: a kill fails it")
    return problems


def redis_visibility_note(app: Celery) -> str | None:
    """With the Redis broker a killed worker's tasks come back after ``visibility_timeout``."""
    url = str(app.conf.broker_url or "")
    if not url.startswith(("redis://", "rediss://", "redis+socket://")):
        return None
    vt = (app.conf.broker_transport_options or {}).get("visibility_timeout", 3600)
    return (
        f"Redis broker: tasks of a worker killed outside memwarden (kernel OOM, kill -9) "
        f"come back after visibility_timeout ({vt:g} s); tasks running longer than that are "
        "delivered twice"
    )


def _redis_url(app: Celery, explicit: str | None, config: Config) -> str | None:
    """Where poison counts live: ``poison_url=``, else the broker or result backend when it
    is Redis, else ``MEMWARDEN_REDIS_URL``, else ``REDIS_URL``."""
    if explicit:
        return explicit
    for url in (app.conf.broker_url, app.conf.result_backend):
        if isinstance(url, str) and url.startswith(("redis://", "rediss://")):
            return url
    return getattr(config, "redis_url", None) or os.environ.get("REDIS_URL")


class CeleryGuard:
    """The wardens of one Celery app's worker: built by its signals, one per process."""

    def __init__(self, app: Celery, poison_url: str | None = None, **options: Any) -> None:
        self.app = app
        self.options = options
        self.config = Config.from_env(**options)  # a bad setting fails at import, clearly
        self.poison_url = poison_url
        self.warden: Warden | None = None  # this process's warden
        self.main_pid: int | None = None
        self.pool = "unknown"
        self.child_share: int | None = None
        self.poison: PoisonJobs | None = None
        self._recycle_at: int | None = None  # child: USS that asked for recycling
        self._requests: ReclaimRequests | None = None  # child: the worker's reclaim asks
        self.intake = Intake()  # main: the gate between the consumer and the pool
        #: Set by a kill that took one pool child only, for that kill's own thread.
        self._child_only = threading.local()
        self.restarter: AfterWarmShutdown | None = None
        self.drained = False
        self._quarantined: list[Any] = []
        #: The Redis broker, whose unacked messages of a killed worker would otherwise wait
        #: for the visibility timeout (AMQP requeues them when the connection drops).
        self.redis_broker: Any = None
        self._uid = f"memwarden-{id(self)}"
        self._timers: list[Any] = []  # the event loop's periodic calls (timer entries)

    def __repr__(self) -> str:
        return f"CeleryGuard(pool={self.pool}, warden={self.warden!r})"

    def connect(self) -> CeleryGuard:
        for sig, handler in (
            (signals.worker_init, self._on_worker_init),
            (signals.worker_ready, self._on_worker_ready),
            (signals.worker_shutdown, self._on_worker_shutdown),
            (signals.worker_process_init, self._on_process_init),
            (signals.worker_process_shutdown, self._on_process_shutdown),
            (signals.task_prerun, self._on_prerun),
            (signals.task_postrun, self._on_postrun),
            (signals.task_success, self._on_outcome),
            (signals.task_failure, self._on_outcome),
            (signals.task_retry, self._on_outcome),
            (signals.task_received, self._on_received),
        ):
            sig.connect(handler, weak=False, dispatch_uid=f"{self._uid}-{handler.__name__}")
        step = type(
            "MemwardenIntake",
            (IntakeStep,),
            {"guard": self, "name": f"memwarden.intake.{self._uid}", "__module__": __name__},
        )
        self.app.steps["consumer"].add(step)
        return self

    # ------------------------------------------------------------ main process
    @_hook_guard
    def _on_worker_init(self, sender: Any = None, **_: Any) -> None:
        worker = sender
        if worker is None or not self._is_ours(worker):
            return
        self.main_pid = os.getpid()
        for problem in no_loss_problems(self.app):
            log.warning("memwarden: JOBS CAN BE LOST: %s", problem)
        note = redis_visibility_note(self.app)
        if note:
            log.info("memwarden: %s", note)
        restarter = self.restarter = AfterWarmShutdown(make_restarter(self.config))
        self.pool = pool_kind(worker.pool_cls)
        hooks = Hooks(
            drain=self._drain,
            pause=self.intake.pause,
            resume=self.intake.resume,
            in_flight=self._in_flight,
            recycle=self._recycle_largest_child if self.pool == "prefork" else None,
            reclaim=(
                self._ask_children_to_reclaim
                if self.pool == "prefork" and self.config.reclaim
                else None
            ),
            before_kill=self._before_kill,
            kill=self._kill,
        )
        self.warden = Warden(self.config, hooks=hooks, restarter=restarter, framework="celery")
        url = _redis_url(self.app, self.poison_url, self.config)
        if url:
            self.poison = PoisonJobs.from_url(url, kills=self.config.poison_kills)
        else:
            log.warning("memwarden: no Redis URL for poison-job counts (pass poison_url=)")
        if self.pool == "prefork":
            self._set_child_share(worker)
            self._forget_stale_flags()
        with contextlib.suppress(Exception):
            conn = self.app.connection_for_read()
            if conn.transport.driver_type == "redis":
                import redis  # celery[redis]

                self.redis_broker = redis.Redis.from_url(conn.as_uri(include_password=True))

    def _is_ours(self, worker: Any) -> bool:
        return getattr(worker, "app", None) is self.app

    def _set_child_share(self, worker: Any) -> None:
        assert self.warden is not None
        state = self.warden.state
        share = self.config.size("child_limit", state.quota)
        own = getattr(worker, "max_memory_per_child", None)  # KiB, Celery's unit
        if share is None and own:
            share = int(own) * 1024
        soft = state.limits.soft
        if share is None and soft is not None:
            base = state.sample or self.warden.read()  # before the pool forks
            share = default_child_share(soft, base.total, int(worker.concurrency or 1))
        self.child_share = share
        if share is not None:
            # billiard's after-task check needs a limit to run at all; we answer it.
            worker.max_memory_per_child = max(1, share // 1024)

    @property
    def runs_tasks_here(self) -> bool:
        """Tasks run in this process, the worker's main one (threads, solo)."""
        return self.pool in ("threads", "solo") and os.getpid() == self.main_pid

    def _in_flight(self) -> list[dict[str, Any]]:
        """Tasks running now: started and not finished (threads, solo), else Celery's own
        record of the tasks its pool children accepted."""
        return self.intake.running() if self.runs_tasks_here else active_tasks()

    @_hook_guard
    def _on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        if self.warden is None or os.getpid() != self.main_pid:
            return
        if sender is not None:
            try:
                self.intake.attach(sender, self.pool, self.redis_broker)
            except Exception:  # the watchdog still runs; pauses then only stop nothing
                log.exception("memwarden: cannot gate this worker's intake")
            if not self._timers:  # not already set by IntakeStep (no event loop)
                self._wake(sender.timer)
        self.warden.start()
        log.info(
            "memwarden: guarding celery worker (%s pool): %r, child share %s",
            self.pool,
            self.warden,
            format_size(self.child_share),
        )

    def _wake(self, timer: Any) -> None:
        """Set the event loop's periodic calls (again: Celery clears its timer when the
        broker connection is lost). celery#6941: a thread's ack does not wake the event
        loop, so with late acks the worker idles for seconds between tasks (and would notice
        a drain late); each wake also brings the consumer in line with a pause or resume."""
        for entry in self._timers:
            with contextlib.suppress(Exception):
                entry.cancel()
        self._timers = [
            timer.call_repeatedly(WAKE_EVERY, self.intake.sync),
            timer.call_repeatedly(WAKE_EVERY, self._release_quarantined),
        ]

    @_hook_guard
    def _on_consumer_start(self, consumer: Any) -> None:
        """Celery's consumer (re)started: a reconnect's new task consumer is gated."""
        if self.warden is not None and os.getpid() == self.main_pid:
            self.intake.reattach(consumer)

    @_hook_guard
    def _on_event_loop(self, hub: Any) -> None:
        """Celery's event loop (re)starts (its timer emptied after a lost connection)."""
        if self.warden is not None and os.getpid() == self.main_pid:
            self._wake(hub.timer)

    def _forget_stale_flags(self) -> None:
        """Recycle flags and reclaim FIFOs left by children that are gone (pids get reused)."""
        with contextlib.suppress(OSError):
            for name in os.listdir(self.config.state_path):
                pid = name.removeprefix("celery-recycle-").removeprefix("celery-reclaim-")
                if pid != name and pid.isdigit() and not alive(int(pid)):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.config.state_path, name))

    def _flag(self, pid: int) -> str:
        return os.path.join(self.config.state_path, f"celery-recycle-{pid}")

    def _reclaim_fifo(self, pid: int) -> str:
        return os.path.join(self.config.state_path, f"celery-reclaim-{pid}")

    def _ask_children_to_reclaim(self, reason: str) -> int:
        """Every pool child that listens reclaims now, beside its running task."""
        self._forget_stale_flags()
        return sum(ask_to_reclaim(self._reclaim_fifo(pid)) for pid in children_of(os.getpid()))

    def _recycle_largest_child(self, reason: str) -> bool:
        """The pool child holding the most (USS) leaves after its current task (of those not
        already leaving: a second recycle in an episode takes another child)."""
        leaving = {pid for pid in children_of(os.getpid()) if os.path.exists(self._flag(pid))}
        largest = largest_child(leaving)
        if largest is None:
            return False
        uss, pid = largest
        os.makedirs(self.config.state_path, exist_ok=True)
        with open(self._flag(pid), "w") as f:
            f.write(reason)
        log.info("memwarden: pool child %d (USS %s) recycles after its task", pid, format_size(uss))
        return True

    def _drain(self) -> None:
        """Celery's warm shutdown: stop consuming, finish the tasks in flight, exit."""
        if self.config.restart == "none":
            return  # recorded only: whoever watches from outside acts
        exits = self.restarter is not None and self.restarter.exits
        code = self.config.exit_code if exits else 0
        self.drained = True
        # What the pool holds unstarted goes back, not run in the drain; the consumer's
        # last fetch is over before Celery's shutdown stops its event loop.
        self.intake.close()
        self.intake.settle(FETCH_SETTLE)
        worker_state.should_stop = code

    @_hook_guard
    def _on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        """The warm shutdown is over: make sure a drain's restart action has run."""
        if self.drained and self.restarter is not None and os.getpid() == self.main_pid:
            self.restarter.restart("memwarden drain finished", at_shutdown=True)

    def _before_kill(self, in_flight: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Everything a hard kill does but the worker's end, which :meth:`_kill` does:

        - A prefork worker at its hard limit loses only its largest pool child when that
          alone brings it under (the kernel's OOM killer would take that child too, but
          later, and then the whole cgroup may stall first): killed here, its task counted,
          and the warden told that it lives on. During a drain that is still true (the warm
          shutdown then ends cleanly); a drain that overran its shutdown timeout takes the
          worker.
        - Threads, solo: no task starts or ends from now on; those running at this instant
          are counted, the consumer takes nothing more, and every message the worker holds
          goes back to its queue (Redis; RabbitMQ requeues when the connection drops).
        - Prefork, the whole worker: intake closed, the tasks its children run counted.

        Returns the ``kill`` record's fields: its exact ``in_flight`` and ``target``."""
        child = self._kill_one_child()
        if child is not None:
            pid, uss = child
            jobs = active_tasks(pid)
            self._count_kills(jobs)
            self._kill_child(pid, uss)
            self._child_only.done = True
            return {"in_flight": jobs, "target": "child", "child_pid": pid, "uss": uss}
        if not self.runs_tasks_here:
            self.intake.close()
            jobs = active_tasks()
            self._count_kills(jobs)
            return {"in_flight": jobs}
        jobs = self.intake.freeze()
        self._count_kills(jobs)
        fields: dict[str, Any] = {"in_flight": jobs}
        given = self._give_back_held()
        if given is not None:
            fields["given_back"] = given
        return fields

    def _count_kills(self, jobs: list[dict[str, Any]]) -> None:
        """One kill against each of these tasks (poison counts), each said. A count that
        cannot be written is said too; the kill goes on."""
        if self.poison is None:
            return
        for job in jobs:
            if job.get("job_id") is not None:
                try:
                    kills = self.poison.record_kill(job["job_id"])
                except Exception as exc:
                    log.warning("memwarden: kill not counted for %s: %s", job["job_id"], exc)
                    continue
                log.warning(
                    "memwarden: %s[%s] was running at this hard kill (%d of %d)",
                    job.get("job"),
                    job["job_id"],
                    kills,
                    self.poison.kills,
                )

    def _kill_one_child(self) -> tuple[int, int] | None:
        """(pid, USS) of the pool child whose death alone brings the worker under its hard
        limit, or None when the worker itself must go."""
        state = None if self.warden is None else self.warden.state
        if (
            self.pool != "prefork"
            or state is None
            or state.overrun
            or state.limits.hard is None
            or state.total is None
            or not self.app.conf.task_reject_on_worker_lost
        ):
            return None
        largest = largest_child()
        if largest is None:
            return None
        uss, pid = largest
        if state.total - uss >= state.limits.hard:
            return None
        return pid, uss

    def _kill_child(self, pid: int, uss: int) -> None:
        """SIGKILL one pool child (its task is rejected back to the queue, billiard forks a
        new child), wait for its memory to go, and tell the warden that the worker lives
        on."""
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            log.warning(
                "memwarden: pool child %d (USS %s) killed at the hard limit; its task goes "
                "back to the queue",
                pid,
                format_size(uss),
            )
        # Judge afresh once its memory is gone (it is freed before the zombie is reaped),
        # or the next reading would take the other child too.
        deadline = time.monotonic() + CHILD_EXIT_WAIT
        while holds_memory(pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.warden is not None:
            self.warden.recovered()

    def _give_back_held(self) -> int | None:
        """Redis, intake closed: once the consumer's last fetch is answered (a blocked one
        is unblocked; one that brought a message has it given back), every message this
        worker still holds goes back to the head of its queue. How many (None: not Redis)."""
        channel = self.intake.channel
        if self.redis_broker is None or channel is None:
            return None
        qos = channel.qos
        self.intake.settle(FETCH_SETTLE)
        tags = held_tags(qos)
        try:
            for tag in tags:
                qos.restore_by_tag(tag, leftmost=False)  # the right end: fetched next
        except Exception as exc:
            log.warning("memwarden: messages not given back (%s); marked for the next worker", exc)
            self._expire_unacked(tags)
        return len(tags)

    def _kill(self) -> None:
        """The worker's end, once :meth:`_before_kill` has done the rest (nothing when only
        a pool child had to die). Threads, solo: SIGKILL. Prefork: pool children die now
        (their memory goes, their tasks are rejected back to the queue), a cold shutdown
        closes the broker connection (Redis puts what the worker held back), and SIGKILL
        ends whatever is left."""
        if getattr(self._child_only, "done", False):
            self._child_only.done = False
            return  # one pool child died; the worker serves on
        if self.runs_tasks_here:
            kill_tree_and_self()  # what it held went back in _before_kill
            return
        me = os.getpid()
        kids = [pid for pid in process_tree(me) if pid != me]
        held = self._held_tags()
        if not kids or not self.app.conf.task_reject_on_worker_lost:
            # No child, or a child's death would fail its task: all at once.
            self._expire_unacked(held)
            kill_tree_and_self()
            return
        for pid in kids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        worker_state.should_terminate = 1
        deadline = time.monotonic() + min(self.config.shutdown_timeout, COLD_STOP_WAIT)
        while time.monotonic() < deadline:
            time.sleep(0.05)
        self._expire_unacked(held)  # whatever the cold stop did not give back
        kill_tree_and_self()

    def _held_tags(self) -> list[Any]:
        """Delivery tags of the messages this worker holds and has not acknowledged."""
        if self.redis_broker is None:
            return []
        tags = []
        for request in reserved_requests():
            tag = getattr(request.message, "delivery_tag", None)
            if tag is not None and not request.acknowledged:
                tags.append(tag)
        return tags

    def _expire_unacked(self, tags: list[Any]) -> None:
        """Before a kill (Redis broker): mark these unacked messages as past their
        visibility timeout, so the next worker to start restores them at once rather than
        an hour later. Only those still unacked are touched (``XX``). (Pushing them back to
        the queue now would race this process's own pending BRPOP.)"""
        if self.redis_broker is None or not tags:
            return
        opts = self.app.conf.broker_transport_options or {}
        key = opts.get("global_keyprefix", "") + opts.get("unacked_index_key", "unacked_index")
        try:
            pipe = self.redis_broker.pipeline()
            for tag in tags:
                pipe.zadd(key, {tag: 0}, xx=True)
            pipe.execute()
        except Exception as exc:  # the kill goes ahead; the visibility timeout still holds
            log.warning("memwarden: unacked messages not marked for restore: %s", exc)

    @_hook_guard
    def _on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        """A poison task is failed, acknowledged and skipped instead of run again."""
        if request is None or self.poison is None or os.getpid() != self.main_pid:
            return
        self._release_quarantined()
        kills = self.poison.count(request.id)
        if kills < self.poison.kills:
            return
        self._quarantine(request, kills)

    @_hook_guard
    def _release_quarantined(self) -> None:
        """Celery reserves a request after ``task_received`` (an ETA task only when its ETA
        comes): a quarantined one leaves the reserved set once it is in it. Left there, it
        held a slot of fetching for good under ``worker_disable_prefetch`` (Redis), which
        fetches only while fewer tasks are reserved than the pool has slots. Event loop's
        thread only (the timer, or the next receipt)."""
        for request in list(self._quarantined):
            if request in worker_state.reserved_requests:
                worker_state.task_ready(request)
                self._quarantined.remove(request)

    def _quarantine(self, request: Any, kills: int) -> None:
        from billiard.einfo import ExceptionInfo

        exc = PoisonJobError(
            f"memwarden: task {request.name}[{request.id}] was running at {kills} hard kills "
            f"of its worker (MEMWARDEN_POISON_KILLS={self.poison.kills if self.poison else kills})"
            ": quarantined as a poison job, not run again"
        )
        try:
            raise exc
        except PoisonJobError:
            einfo = ExceptionInfo()
        request.on_failure(einfo)  # FAILURE in the result backend, task_failure, event
        request.acknowledge()
        # Celery skips a request it believes revoked (and releases its pool slot).
        request._already_revoked = True
        self._quarantined.append(request)
        if self.warden is not None:
            self.warden.quarantined(request.name, request.id, kills, reason=str(exc))

    # ------------------------------------------------------------ pool children
    @_hook_guard
    def _on_process_init(self, **_: Any) -> None:
        if self.main_pid is None or os.getpid() == self.main_pid:
            return  # solo sends this signal in the main process
        self.warden = None  # never the parent's copy
        self._recycle_at = None
        share = self.child_share
        if share is None:
            return
        platform = detect_platform(os.environ)
        self.warden = Warden(
            self.config,
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
        billiard.pool.mem_rss = self._child_memory_kib
        if self.config.reclaim:
            # Asked, a child reclaims at once but decides nothing: billiard can let it go
            # only after a task, so its recycle is decided there (an idle child deciding
            # now would record a recycle and then run one more task).
            warden = self.warden
            self._requests = ReclaimRequests(
                self._reclaim_fifo(os.getpid()),
                lambda: warden.reclaim_now("asked by the worker: over its soft limit", False),
            ).listen()

    @_hook_guard
    def _on_process_shutdown(self, **_: Any) -> None:
        if self._requests is not None:  # a child leaving (recycled): its FIFO goes too
            self._requests.close()

    def _recycle(self, reason: str) -> bool:
        total = self.warden.state.total if self.warden is not None else None
        self._recycle_at = total if total is not None else self.child_share
        return True

    def _child_memory_kib(self) -> int:
        """billiard's after-task memory figure (KiB) for its ``worker_max_memory_per_child``
        check: over the limit exactly when this child's warden asked to recycle."""
        share_kib = max(1, (self.child_share or 0) // 1024)
        if self._recycle_at is None and os.path.exists(self._flag(os.getpid())):
            with contextlib.suppress(OSError):
                os.unlink(self._flag(os.getpid()))
            mem = smaps_rollup(os.getpid())
            self._recycle_at = mem.uss if mem is not None else self_rss()  # main journaled it
        if self._recycle_at is not None:
            return max(share_kib + 1, self._recycle_at // 1024)
        return share_kib

    # ------------------------------------------------------------ every task
    @_hook_guard
    def _on_prerun(self, task_id: Any = None, task: Any = None, **_: Any) -> None:
        if self.warden is not None and task is not None:
            if self.runs_tasks_here:
                self.intake.started(task_id, task.name)  # held here once a kill is decided
            queue = (getattr(task.request, "delivery_info", None) or {}).get("routing_key")
            extra = {"queue": queue} if queue else {}
            self.warden.job_started(task.name, task_id, **extra)

    @_hook_guard
    def _on_outcome(self, sender: Any = None, **kwargs: Any) -> None:
        """Celery has stored the task's outcome: it has finished (threads, solo)."""
        if not self.runs_tasks_here:
            return
        task_id = kwargs.get("task_id")
        if task_id is None:
            request = kwargs.get("request") or getattr(sender, "request", None)
            task_id = getattr(request, "id", None)
        if task_id is not None:
            self.intake.finished(task_id)

    @_hook_guard
    def _on_postrun(self, task_id: Any = None, **_: Any) -> None:
        if self.runs_tasks_here:
            self.intake.finished(task_id)  # an outcome stored nowhere (Reject, Ignore)
        if self.warden is not None:
            self.warden.job_finished(task_id)


class IntakeStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """A step of the worker's consumer, after its task consumer: at every (re)start of the
    consumer (a broker reconnect rebuilds connection, channel and task consumer, and clears
    the event loop's timer) memwarden's gate and periodic calls are set again. Bound to
    one :class:`CeleryGuard` by :meth:`CeleryGuard.connect`."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    guard: CeleryGuard

    def start(self, parent: Any) -> None:
        self.guard._on_consumer_start(parent)

    def register_with_event_loop(self, parent: Any, hub: Any) -> None:
        self.guard._on_event_loop(hub)


def default_child_share(soft: int, base: int, concurrency: int) -> int:
    """A pool child's share when none is set: what the worker leaves under the soft limit
    before its pool starts (``base``: the main process, the cgroup's other memory), split
    between the children; never less than soft / (concurrency + 1)."""
    return max(soft // (concurrency + 1), (soft - base) // max(1, concurrency))


def largest_child(skip: set[int] | None = None) -> tuple[int, int] | None:
    """(USS, pid) of this process's child holding the most private memory, if any (pids
    in ``skip`` left out)."""
    sizes = []
    for pid in children_of(os.getpid()):
        if skip and pid in skip:
            continue
        mem = smaps_rollup(pid)
        if mem is not None:
            sizes.append((mem.uss, pid))
    return max(sizes, default=None)


def holds_memory(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has given its memory back)."""
    fields = stat_fields(pid)
    return fields is not None and bool(fields) and fields[0] not in (b"Z", b"X")


def held_tags(qos: Any) -> list[Any]:
    """Delivery tags of the messages a kombu virtual channel (Redis) holds unacknowledged."""
    for _ in range(5):
        with contextlib.suppress(RuntimeError):  # changed size: the loop's thread
            dirty = set(qos._dirty)
            return [tag for tag in list(qos._delivered) if tag not in dirty]
    return []


def redis_client_id(redis_client: Any, connection: Any) -> int | None:
    """The Redis server's id for a redis-py ``connection`` of this process (matched by
    its socket's address in ``CLIENT LIST``), or None."""
    sock = getattr(connection, "_sock", None)
    if sock is None:
        return None
    host, port = sock.getsockname()[:2]
    for client in redis_client.client_list():
        if client.get("addr") in (f"{host}:{port}", f"[{host}]:{port}"):
            return int(client["id"])
    return None


def reserved_requests() -> list[Any]:
    """The task messages this worker holds (prefetched or running), from Celery's state."""
    for _ in range(5):
        with contextlib.suppress(RuntimeError):  # set changed size: another thread
            held = {id(r): r for r in list(worker_state.active_requests)}
            held.update((id(r), r) for r in list(worker_state.reserved_requests))
            return list(held.values())
    return []


def active_tasks(pid: int | None = None) -> list[dict[str, Any]]:
    """Tasks running in this worker now (in pool child ``pid`` only, if given), from
    Celery's own state (main process)."""
    for _ in range(5):
        with contextlib.suppress(RuntimeError):  # set changed size: another thread
            return [
                {"job": r.name, "job_id": r.id}
                for r in list(worker_state.active_requests)
                if pid is None or r.worker_pid == pid
            ]
    return []


def pool_kind(pool_cls: Any) -> str:
    """``prefork``, ``threads``, ``solo`` (or another name) for a worker's pool class."""
    cls = get_implementation(pool_cls) if isinstance(pool_cls, str) else pool_cls
    module = getattr(cls, "__module__", "")
    return {
        "celery.concurrency.prefork": "prefork",
        "celery.concurrency.thread": "threads",
        "celery.concurrency.solo": "solo",
    }.get(module, module.rsplit(".", 1)[-1] or "unknown")


def guard(app: Celery, *, poison_url: str | None = None, **options: Unpack[Options]) -> CeleryGuard:
    """Guard ``app``'s workers. Options are the ``Config`` settings (``soft_limit="400MB"``,
    ``reclaim=False``, ...), else ``MEMWARDEN_*``; ``poison_url`` is the Redis for
    poison-job counts (default: the broker or result backend when it is Redis)."""
    return CeleryGuard(app, poison_url, **options).connect()


def check_app(spec: str) -> Callable[[Config, Mapping[str, str]], list[str]]:
    """A ``memwarden check`` extra for ``--celery-app proj.celery:app``."""
    from celery.app.utils import find_app

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as ``celery -A`` does
    app = find_app(spec)

    def celery_checks(config: Config, env: Mapping[str, str]) -> list[str]:
        out = [f"celery: JOBS CAN BE LOST: {p}" for p in no_loss_problems(app)]
        note = redis_visibility_note(app)
        if note:
            out.append(f"celery: {note}")
        return out

    return celery_checks
