"""A Celery worker's main process: the whole worker's warden, its intake gate, the drain,
the recycle of a pool child, and the hard kill (of one pool child, or of the worker with
its tasks given back); poison tasks quarantined as they arrive."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any

from celery import Celery, bootsteps
from celery.concurrency import get_implementation
from celery.worker import state as worker_state

from memwarden.config import Config
from memwarden.gauges.proc import children_of, process_tree, smaps_rollup, stat_fields
from memwarden.hooks import Hooks
from memwarden.integrations.celery.common import (
    ChildFiles,
    PoisonJobError,
    hook_guard,
    log,
    no_loss_problems,
    redis_visibility_note,
)
from memwarden.integrations.celery.intake import WAKE_EVERY, Intake
from memwarden.poison import PoisonJobs
from memwarden.reclaim import ask_to_reclaim
from memwarden.restart import Restarter, make_restarter
from memwarden.restart.exit import ExitRestarter
from memwarden.units import format_size
from memwarden.warden import Warden, kill_tree_and_self

#: Longest wait for the cold shutdown to close the broker connection before SIGKILL.
COLD_STOP_WAIT = 10.0
#: Longest wait for a pool child killed at the hard limit to give its memory back.
CHILD_EXIT_WAIT = 2.0
#: Longest wait (s), at a drain or a kill, for the consumer's pending Redis fetch to be
#: ended and read (a few ms while the event loop runs; it is not waited for once stopped).
FETCH_SETTLE = 0.5


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


def _redis_url(app: Celery, explicit: str | None, config: Config) -> str | None:
    """Where poison counts live: ``poison_url=``, else the broker or result backend when it
    is Redis, else ``MEMWARDEN_REDIS_URL``, else ``REDIS_URL``."""
    if explicit:
        return explicit
    for url in (app.conf.broker_url, app.conf.result_backend):
        if isinstance(url, str) and url.startswith(("redis://", "rediss://")):
            return url
    return getattr(config, "redis_url", None) or os.environ.get("REDIS_URL")


class WorkerSide:
    """The worker's main process: its warden (built at ``worker_init``, started at
    ``worker_ready``) and every ladder hook it gives."""

    def __init__(self, app: Celery, config: Config, poison_url: str | None) -> None:
        self.app = app
        self.config = config
        self.poison_url = poison_url
        self.files = ChildFiles(config.state_path)
        self.warden: Warden | None = None
        self.main_pid: int | None = None
        self.pool = "unknown"
        self.child_share: int | None = None
        self.poison: PoisonJobs | None = None
        self.intake = Intake()  # the gate between the consumer and the pool
        #: Set by a kill that took one pool child only, for that kill's own thread.
        self._child_only = threading.local()
        self.restarter: AfterWarmShutdown | None = None
        self.drained = False
        self._quarantined: list[Any] = []
        #: The Redis broker, whose unacked messages of a killed worker would otherwise wait
        #: for the visibility timeout (AMQP requeues them when the connection drops).
        self.redis_broker: Any = None
        self._timers: list[Any] = []  # the event loop's periodic calls (timer entries)

    @property
    def runs_tasks_here(self) -> bool:
        """Tasks run in this process, the worker's main one (threads, solo)."""
        return self.pool in ("threads", "solo") and os.getpid() == self.main_pid

    def _here(self) -> bool:
        """This is the worker's main process, and its warden is built."""
        return self.warden is not None and os.getpid() == self.main_pid

    # ------------------------------------------------------------ start, stop
    @hook_guard
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
            self.files.forget_stale()
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

    @hook_guard
    def _on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        if not self._here():
            return
        assert self.warden is not None
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

    @hook_guard
    def _on_consumer_start(self, consumer: Any) -> None:
        """Celery's consumer (re)started: a reconnect's new task consumer is gated."""
        if self._here():
            self.intake.reattach(consumer)

    @hook_guard
    def _on_event_loop(self, hub: Any) -> None:
        """Celery's event loop (re)starts (its timer emptied after a lost connection)."""
        if self._here():
            self._wake(hub.timer)

    @hook_guard
    def _on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        """The warm shutdown is over: make sure a drain's restart action has run."""
        if self.drained and self.restarter is not None and os.getpid() == self.main_pid:
            self.restarter.restart("memwarden drain finished", at_shutdown=True)

    # ------------------------------------------------------------ the soft rungs
    def _in_flight(self) -> list[dict[str, Any]]:
        """Tasks running now: started and not finished (threads, solo), else Celery's own
        record of the tasks its pool children accepted."""
        return self.intake.running() if self.runs_tasks_here else active_tasks()

    def _ask_children_to_reclaim(self, reason: str) -> int:
        """Every pool child that listens reclaims now, beside its running task."""
        self.files.forget_stale()
        pids = children_of(os.getpid())
        return sum(ask_to_reclaim(self.files.reclaim_fifo(pid)) for pid in pids)

    def _recycle_largest_child(self, reason: str) -> bool:
        """The pool child holding the most (USS) leaves after its current task (of those not
        already leaving: a second recycle in an episode takes another child)."""
        flag = self.files.recycle_flag
        staying = [pid for pid in children_of(os.getpid()) if not os.path.exists(flag(pid))]
        largest = largest_child(staying)
        if largest is None:
            return False
        uss, pid = largest
        os.makedirs(self.config.state_path, exist_ok=True)
        with open(flag(pid), "w") as f:
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

    # ------------------------------------------------------------ the hard kill
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
        largest = largest_child(children_of(os.getpid()))
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

    @hook_guard
    def _on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        """A poison task is failed, acknowledged and skipped instead of run again."""
        if request is None or self.poison is None or os.getpid() != self.main_pid:
            return
        self._release_quarantined()
        kills = self.poison.count(request.id)
        if kills < self.poison.kills:
            return
        self._quarantine(request, kills)

    @hook_guard
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


class IntakeStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """A step of the worker's consumer, after its task consumer: at every (re)start of the
    consumer (a broker reconnect rebuilds connection, channel and task consumer, and clears
    the event loop's timer) memwarden's gate and periodic calls are set again. Bound to
    one :class:`WorkerSide` by :meth:`CeleryGuard.connect`."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    worker: WorkerSide

    def start(self, parent: Any) -> None:
        self.worker._on_consumer_start(parent)

    def register_with_event_loop(self, parent: Any, hub: Any) -> None:
        self.worker._on_event_loop(hub)


def default_child_share(soft: int, base: int, concurrency: int) -> int:
    """A pool child's share when none is set: what the worker leaves under the soft limit
    before its pool starts (``base``: the main process, the cgroup's other memory), split
    between the children; never less than soft / (concurrency + 1)."""
    return max(soft // (concurrency + 1), (soft - base) // max(1, concurrency))


def largest_child(pids: list[int]) -> tuple[int, int] | None:
    """(USS, pid) of the process among ``pids`` holding the most private memory, if any."""
    sizes = []
    for pid in pids:
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
