"""Celery: ``memwarden.celery.guard(app, **options)`` keeps a worker inside its quota.

Nothing happens in a process that only sends tasks: the wardens are built by the worker's
own signals.

- **Main process** (``worker_init``; watchdog from ``worker_ready``): the whole worker's
  figure (cgroup working set, else the PSS of its process tree). Over the soft limit:
  reclaim, then after the grace a *warm shutdown* (Celery stops consuming, lets in-flight
  tasks finish, closes its broker connection so prefetched messages go back) and the
  restart action; for ``signal``/``exit`` the warm shutdown is the restart (the process
  exits, with ``exit_code`` for ``exit``, and its supervisor starts it again). At the hard
  limit (or on course to cross it before the next reading) a prefork worker loses only its
  largest pool child when that alone brings it under: that child's task is counted as a
  poison candidate and rejected back to the queue, billiard forks a new child, the worker
  serves on. Otherwise, and after the shutdown timeout: the tasks in flight are counted as
  poison candidates, pool children are killed at once (their tasks are rejected back to
  the queue), a cold shutdown gets the broker connection closed, then SIGKILL. Where the task
  runs in the worker itself (threads, solo) the worker is killed at once; on Redis its
  unacked messages are first marked as timed out, so the next worker restores them.
- **Prefork children** (``worker_process_init``): a ``job`` record per task from
  ``task_prerun``/``task_postrun``; after each task a child whose USS is over its share
  reclaims, then recycles by Celery's own ``worker_max_memory_per_child`` path — billiard's
  after-task memory check, answered with current USS instead of ``ru_maxrss`` (a peak
  that a freshly forked child inherits, so it would recycle after every task).
- **threads / solo pools**: tasks run in the main process, whose warden writes the
  records.

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
from typing import Any

import billiard.pool
from celery import Celery, signals
from celery.concurrency import get_implementation
from celery.worker import state as worker_state

from memwarden.config import Config
from memwarden.gauges import Sample
from memwarden.gauges.proc import children_of, process_tree, self_rss, smaps_rollup
from memwarden.gauges.quota import Quota, detect_platform
from memwarden.poison import PoisonJobs
from memwarden.reclaim import ReclaimRequests, ask_to_reclaim
from memwarden.restart import NoRestart, Restarter, make_restarter
from memwarden.restart.exit import ExitRestarter
from memwarden.units import format_size
from memwarden.warden import Hooks, Warden, kill_tree_and_self, swallow

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
NEVER = 10 * 365 * 24 * 3600.0
#: Longest wait for the cold shutdown to close the broker connection before SIGKILL.
COLD_STOP_WAIT = 10.0
#: Longest wait for a pool child killed at the hard limit to give its memory back.
CHILD_EXIT_WAIT = 2.0
#: Event-loop wake-up period for the threads pool (celery#6941).
WAKE_EVERY = 0.1


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
        self._child_to_kill: tuple[int, int] | None = None  # main: (pid, USS) at a hard kill
        self.restarter: AfterWarmShutdown | None = None
        self.drained = False
        self._quarantined: list[Any] = []
        #: The Redis broker, whose unacked messages of a killed worker would otherwise wait
        #: for the visibility timeout (AMQP requeues them when the connection drops).
        self.redis_broker: Any = None
        self._uid = f"memwarden-{id(self)}"

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
            (signals.task_received, self._on_received),
        ):
            sig.connect(handler, weak=False, dispatch_uid=f"{self._uid}-{handler.__name__}")
        return self

    # ------------------------------------------------------------ main process
    @swallow
    def _on_worker_init(self, sender: Any = None, **_: Any) -> None:
        worker = sender
        if worker is None or getattr(worker, "app", None) is not self.app:
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
            in_flight=active_tasks,
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

    def _set_child_share(self, worker: Any) -> None:
        assert self.warden is not None
        share = self.config.size("child_limit", self.warden.quota.limit)
        own = getattr(worker, "max_memory_per_child", None)  # KiB, Celery's unit
        if share is None and own:
            share = int(own) * 1024
        soft = self.warden.limits.soft
        if share is None and soft is not None:
            base = self.warden.last_sample or self.warden.read()  # before the pool forks
            share = default_child_share(soft, base.total, int(worker.concurrency or 1))
        self.child_share = share
        if share is not None:
            # billiard's after-task check needs a limit to run at all; we answer it.
            worker.max_memory_per_child = max(1, share // 1024)

    @swallow
    def _on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        if self.warden is None or os.getpid() != self.main_pid:
            return
        if self.pool == "threads" and sender is not None:
            # celery#6941: a thread's ack does not wake the event loop, so with late acks
            # the worker idles for seconds between tasks (and would notice a drain late).
            sender.timer.call_repeatedly(WAKE_EVERY, _wake)
        self.warden.start()
        log.info(
            "memwarden: guarding celery worker (%s pool): %r, child share %s",
            self.pool,
            self.warden,
            format_size(self.child_share),
        )

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

    def _ear(self, pid: int) -> str:
        return os.path.join(self.config.state_path, f"celery-reclaim-{pid}")

    def _ask_children_to_reclaim(self, reason: str) -> int:
        """Every pool child that listens reclaims now, beside its running task."""
        self._forget_stale_flags()
        return sum(ask_to_reclaim(self._ear(pid)) for pid in children_of(os.getpid()))

    def _recycle_largest_child(self, reason: str) -> bool:
        """The pool child holding the most (USS) leaves after its current task."""
        largest = largest_child()
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
        worker_state.should_stop = code

    @swallow
    def _on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        """The warm shutdown is over: make sure a drain's restart action has run."""
        if self.drained and self.restarter is not None and os.getpid() == self.main_pid:
            self.restarter.restart("memwarden drain finished", at_shutdown=True)

    def _before_kill(self, in_flight: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Choose what dies and count its tasks as poison candidates. A prefork worker at
        its hard limit loses only its largest pool child when that alone brings it under:
        the kernel's OOM killer would take that child too, but later, and then the whole
        cgroup may stall first. During a drain that is still true (the warm shutdown then
        ends cleanly); a drain that overran its shutdown timeout takes the worker."""
        self._child_to_kill = self._kill_one_child()
        fields: dict[str, Any] | None = None
        if self._child_to_kill is not None:
            pid, uss = self._child_to_kill
            in_flight = active_tasks(pid)
            fields = {"in_flight": in_flight, "target": "child", "child_pid": pid, "uss": uss}
        if self.poison is None:
            return fields
        for job in in_flight:
            if job.get("job_id") is not None:
                kills = self.poison.record_kill(job["job_id"])
                log.warning(
                    "memwarden: %s[%s] was running at this hard kill (%d of %d)",
                    job.get("job"),
                    job["job_id"],
                    kills,
                    self.poison.kills,
                )
        return fields

    def _kill_one_child(self) -> tuple[int, int] | None:
        """(pid, USS) of the pool child whose death alone brings the worker under its hard
        limit, or None when the worker itself must go."""
        warden = self.warden
        if (
            self.pool != "prefork"
            or warden is None
            or warden.overrun
            or warden.limits.hard is None
            or warden.last_sample is None
            or not self.app.conf.task_reject_on_worker_lost
        ):
            return None
        largest = largest_child()
        if largest is None:
            return None
        uss, pid = largest
        if warden.last_sample.total - uss >= warden.limits.hard:
            return None
        return pid, uss

    def _kill(self) -> None:
        """At the hard limit, the largest pool child alone when that suffices (its task is
        rejected back to the queue, billiard forks a new child, the worker serves on).
        Otherwise cold stop, then kill: pool children die now (their memory goes, their tasks
        are rejected back to the queue), a cold shutdown closes the broker connection (Redis
        puts prefetched messages back), and SIGKILL ends whatever is left."""
        target, self._child_to_kill = self._child_to_kill, None
        if target is not None and self.warden is not None:
            pid, uss = target
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                log.warning(
                    "memwarden: pool child %d (USS %s) killed at the hard limit; its task "
                    "goes back to the queue",
                    pid,
                    format_size(uss),
                )
            # Judge afresh once its memory is gone (it is freed before the zombie is reaped),
            # or the next reading would take the other child too.
            deadline = time.monotonic() + CHILD_EXIT_WAIT
            while holds_memory(pid) and time.monotonic() < deadline:
                time.sleep(0.005)
            self.warden.policy.did_recover()
            return
        me = os.getpid()
        kids = [pid for pid in process_tree(me) if pid != me]
        held = self._held_tags()
        if self.pool != "prefork" or not kids or not self.app.conf.task_reject_on_worker_lost:
            # The task runs in this process, or a child's death would fail it: all at once.
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

    @swallow
    def _on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        """A poison task is failed, acknowledged and skipped instead of run again."""
        if request is None or self.poison is None or os.getpid() != self.main_pid:
            return
        while self._quarantined:
            worker_state.task_ready(self._quarantined.pop())
        kills = self.poison.count(request.id)
        if kills < self.poison.kills:
            return
        self._quarantine(request, kills)

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
            self.warden.journal.write(
                "quarantine",
                job=request.name,
                job_id=request.id,
                kills=kills,
                framework="celery",
                reason=str(exc),
            )
        log.error("%s", exc)

    # ------------------------------------------------------------ pool children
    @swallow
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
                self._ear(os.getpid()),
                lambda: warden.reclaim_now("asked by the worker: over its soft limit", False),
            ).listen()

    @swallow
    def _on_process_shutdown(self, **_: Any) -> None:
        if self._requests is not None:  # a child leaving (recycled): its FIFO goes too
            self._requests.close()

    def _recycle(self, reason: str) -> bool:
        sample = self.warden.last_sample if self.warden is not None else None
        self._recycle_at = sample.total if sample is not None else self.child_share
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
    @swallow
    def _on_prerun(self, task_id: Any = None, task: Any = None, **_: Any) -> None:
        if self.warden is not None and task is not None:
            queue = (getattr(task.request, "delivery_info", None) or {}).get("routing_key")
            extra = {"queue": queue} if queue else {}
            self.warden.job_started(task.name, task_id, **extra)

    @swallow
    def _on_postrun(self, task_id: Any = None, **_: Any) -> None:
        if self.warden is not None:
            self.warden.job_finished(task_id)


def _wake() -> None:
    """Nothing: being called is the point (the loop then sees acks and flags)."""


def default_child_share(soft: int, base: int, concurrency: int) -> int:
    """A pool child's share when none is set: what the worker leaves under the soft limit
    before its pool starts (``base``: the main process, the cgroup's other memory), split
    between the children; never less than soft / (concurrency + 1)."""
    return max(soft // (concurrency + 1), (soft - base) // max(1, concurrency))


def largest_child() -> tuple[int, int] | None:
    """(USS, pid) of this process's child holding the most private memory, if any."""
    sizes = []
    for pid in children_of(os.getpid()):
        mem = smaps_rollup(pid)
        if mem is not None:
            sizes.append((mem.uss, pid))
    return max(sizes, default=None)


def holds_memory(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has given its memory back)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split(None, 1)[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process
    return True


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


def guard(app: Celery, *, poison_url: str | None = None, **options: Any) -> CeleryGuard:
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
