"""RQ: ``rq worker -w memwarden.rq.Worker`` (or ``memwarden.rq.SimpleWorker``).

One :class:`~memwarden.warden.Warden` per worker, built when ``work()`` starts; its settings
come from ``MEMWARDEN_*`` (or ``Worker(..., memwarden={"soft_limit": "400MB"})``).

- ``Worker`` forks a work horse per job. The watchdog runs in the parent and measures the
  whole worker (parent + horse: the cgroup working set, else the tree's PSS), so a parent
  that accumulates memory — and inflates every horse it forks — is seen too. The horse
  measures its own RSS before and after the job and hands the figures to the parent through
  a pipe; the parent writes one ``job`` record per job (``pid`` is the horse's) with the
  horse's ``peak_rss`` from ``os.wait4`` (``ru_maxrss``: a PEAK over the horse's life,
  pages shared with the parent included — never its size at the end).
- ``SimpleWorker`` runs jobs in its own process: ``job`` records from the warden's own hooks.
- Over the soft limit intake pauses: the job in hand goes on, no new one is taken until
  memory is back under the limit (a job a dequeue under way brings back goes back to the
  front of its queue); the forking ``Worker`` judges its memory before each dequeue, for
  its parent grows between horses. Then: reclaim, (``Worker``) let the horse end with its
  job, then after the grace time drain — take no new job, the current one finishes, an
  idle worker leaves its (stepped) blocking dequeue — and restart through the configured
  action (default: SIGTERM to ourselves, RQ's own warm shutdown). Something must start
  the worker again: ``rq worker-pool``, ``memwarden run``, the dyno manager, Kubernetes,
  systemd.
- Over the hard limit: ``Worker`` kills only the horse when the parent alone is under the
  limit; the parent survives and re-enqueues the job. Otherwise (and always for
  ``SimpleWorker``) the job in flight is re-enqueued from the warden's ``before_kill`` hook,
  then the whole worker is killed. Either way it leaves the started registry and is
  re-enqueued once per kill, never left to the failed registry as "abandoned".
- Poison jobs: every such kill is counted against the job id in Redis (:class:`PoisonJobs`);
  at ``poison_kills`` kills the job goes to the failed registry with a reason naming
  memwarden and the count instead of coming back.

Needs rq >= 3.0 (executions, ``record_job_failure``).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import rq
from rq.exceptions import NoSuchJobError, StopRequested
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.queue import Queue
from rq.timeouts import JobTimeoutException
from rq.utils import parse_composite_key
from rq.worker import WorkerStatus

from memwarden.config import Config, Options
from memwarden.gauges.proc import ProcessMemory, alive, self_rss, smaps_rollup
from memwarden.hooks import Hooks
from memwarden.poison import PoisonJobs
from memwarden.units import SettingError
from memwarden.warden import Warden, kill_tree_and_self, signals_held, swallow_but

#: RQ's control flow from its signal handlers: a stop asked of an idle worker, a job's
#: timeout (the death penalty). Raised into whatever runs, our hooks too: it passes through.
HOST_CONTROL_FLOW: tuple[type[BaseException], ...] = (StopRequested, JobTimeoutException)
_hook_guard = swallow_but(*HOST_CONTROL_FLOW)

log = logging.getLogger("memwarden")

#: Longest single blocking dequeue (seconds): how soon an idle worker sees a drain.
DRAIN_POLL = 5
#: Seconds between two heartbeats of a worker that waits out a pause or a drain.
HEARTBEAT_EVERY = 5.0
#: Seconds between two looks, by an idle guarded worker, for jobs whose worker died without
#: memwarden's kill (the kernel's OOM killer, a crash): they go back to their queue.
RESCUE_EVERY = 15.0
#: Seconds the main thread waits for a whole-worker kill under way before it ends itself.
KILL_WAIT = 30.0

__all__ = ["SimpleWorker", "WardenMixin", "Worker", "poison_reason"]


def poison_reason(kills: int, limit: int) -> str:
    """The failure text of a quarantined job (what ``rq info``/the dashboard shows)."""
    return (
        f"memwarden: quarantined as a poison job: it was running at {kills} hard kills of its "
        f"worker (memory over the hard limit; MEMWARDEN_POISON_KILLS={limit}). "
        "Not retried; requeue it by hand once fixed."
    )


def _own_rss() -> int:
    try:
        return self_rss()
    except Exception:  # never let a reading fail a job
        return 0


#: RQ's warm and cold stop signals (its handlers raise ``StopRequested`` when idle).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# The type checker sees the worker the mixin is mixed into. RQ leaves a few of its methods
# unannotated (procline, register_death, clean_registries): their calls are marked for it.
if TYPE_CHECKING:
    _MixinBase = rq.worker.BaseWorker
else:
    _MixinBase = object


def _horse_memory(horse: int) -> ProcessMemory | None:
    """The horse's memory; None once it is leaving: gone, or its address space torn down
    (exiting, a zombie: its ``smaps_rollup`` reads empty, every figure 0)."""
    mem = smaps_rollup(horse)
    return mem if mem is not None and mem.rss > 0 else None


class WardenMixin(_MixinBase):
    """The warden's side of an RQ worker; mixed into ``rq.Worker`` and ``rq.SimpleWorker``."""

    #: Options for the Warden (keyword names of ``Config``), for subclasses.
    memwarden_options: Options = {}

    #: redis-py types every reply as ``Awaitable | Any`` (one signature for sync and async).
    connection: Any

    def __init__(
        self,
        *args: Any,
        memwarden: Options | None = None,
        warden: Warden | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._mw_options: Options = {**self.memwarden_options, **(memwarden or {})}
        if warden is None:
            Config.from_env(**self._mw_options)  # a bad setting stops us now, naming it
        self._mw_given = warden
        self.warden: Warden | None = None
        self.poison: PoisonJobs | None = None
        self._mw_current: tuple[Job, Queue] | None = None
        self._mw_draining = False
        self._mw_parked = False  # drained and out of RQ's dequeue: safe to stop
        self._mw_paused = False  # memory over the soft limit: take no job for now
        self._mw_kill_lock = threading.Lock()
        self._mw_kill_target: str | None = None  # "horse" or "all" once a kill is decided
        self._mw_last_kill: str | None = None  # the same, kept for the kill hook itself
        #: A job's end being recorded and a kill's judgement of it never overlap.
        self._mw_end_lock = threading.RLock()
        self._mw_killing = False  # a whole-worker kill under way: the main thread stops
        self._mw_rescued_at = 0.0

    def execute_job(self, job: Job, queue: Queue) -> None:
        if self.warden is None:
            super().execute_job(job, queue)
            return
        self._mw_current = (job, queue)
        try:
            super().execute_job(job, queue)
        finally:
            self._mw_current = None
            self._mw_after_job()

    def _mw_after_job(self) -> None:
        """After ``execute_job``: the forking worker reads its horse's report here."""

    # RQ records a job's end in these (in the process that ran it): under the end lock, so
    # that a kill judges the job as ended or not, never half-way.
    def handle_job_success(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> Any:
        with self._mw_ending():
            return super().handle_job_success(job, queue, *args, **kwargs)

    def handle_job_retry(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> Any:
        with self._mw_ending():
            return super().handle_job_retry(job, queue, *args, **kwargs)

    def handle_job_failure(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> Any:
        with self._mw_ending():
            if self._mw_comes_back(job, queue, kwargs.get("execution")):
                return None
            return super().handle_job_failure(job, queue, *args, **kwargs)

    def _mw_comes_back(self, job: Job, queue: Queue, execution: Any) -> bool:
        """True once a failed job was re-enqueued (or quarantined) here instead."""
        return False

    @contextlib.contextmanager
    def _mw_ending(self) -> Iterator[None]:
        with self._mw_end_lock:
            self._mw_hold_if_killing()
            yield

    def _mw_hold_if_killing(self) -> None:
        """The main thread stops here while a whole-worker kill is under way (it ends us in
        a moment): no job's end, no new job, is recorded behind the kill's back."""
        if not self._mw_killing:
            return
        deadline = time.monotonic() + KILL_WAIT
        while time.monotonic() < deadline:
            time.sleep(0.05)
        kill_tree_and_self()  # the kill did not come: end as it would have

    # ----------------------------------------------------------------- set-up
    def _mw_hooks(self) -> Hooks:
        return Hooks(
            drain=self._mw_drain,
            pause=self._mw_pause,
            resume=self._mw_resume,
            in_flight=self._mw_in_flight,
            before_kill=self._mw_before_kill,
            kill=self._mw_kill,
        )

    def _mw_setup(self) -> None:
        if self.warden is not None:
            return
        try:
            if self._mw_given is not None:
                self.warden = self._mw_given
                self.warden.attach(self._mw_hooks())
            else:
                self.warden = Warden(hooks=self._mw_hooks(), framework="rq", **self._mw_options)
            self.poison = PoisonJobs(self.connection, kills=self.warden.config.poison_kills)
        except SettingError:
            raise  # before any job: the worker stops loudly, naming the env var
        except Exception:
            # Anything else (a platform we cannot read): say so loudly, keep serving.
            log.exception("memwarden: RQ worker %s runs WITHOUT memory guard", self.name)
            self.warden = None
            return
        log.info("memwarden: guarding RQ worker %s: %r", self.name, self.warden)

    def work(self, *args: Any, **kwargs: Any) -> bool:
        self._mw_setup()
        if self.warden is not None:
            self.warden.start()
        try:
            return bool(super().work(*args, **kwargs))
        finally:
            if self.warden is not None:
                self.warden.stop()

    # ----------------------------------------------------------------- hooks
    def _mw_in_flight(self) -> list[dict[str, Any]]:
        current = self._mw_current
        if current is not None:
            job, queue = current
            return [{"job": job.func_name, "job_id": job.id, "queue": queue.name}]
        if self._mw_draining and not self._mw_parked:
            # Drained but still inside a dequeue: a job may be on its way to us. The restart
            # waits until we park (at most DRAIN_POLL), so its signal never cuts a dequeue.
            return [{"job": "rq:dequeue", "job_id": None}]
        return []

    def _mw_drain(self) -> None:
        """Take no new job; the one running finishes. The restart action then stops us."""
        self._mw_draining = True
        log.warning("memwarden: RQ worker %s drains: no new job after the current one", self.name)

    def _mw_pause(self) -> None:
        """Take no job for now (the one in hand goes on): memory is over the soft limit."""
        self._mw_paused = True

    def _mw_resume(self) -> None:
        self._mw_paused = False

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> Any:
        """RQ's blocking dequeue, in steps of at most ``DRAIN_POLL`` seconds so a drain or a
        pause is seen between two steps (never by interrupting one: a job popped by a
        cut-off dequeue would sit in RQ's intermediate queue and be failed a minute later).
        A job that a step brings back once a pause or a drain began goes back to the front
        of its queue."""
        dequeue = super().dequeue_job_and_maintain_ttl
        if self.warden is None:
            return dequeue(timeout, max_idle_time)
        self._mw_hold_if_killing()
        if timeout is None:  # burst mode (no blocking)
            return self._mw_in_hand(dequeue(timeout, max_idle_time))
        self._mw_before_dequeue()
        idle_since = time.monotonic()
        while True:
            if self._mw_draining:
                return self._mw_wait_drained()
            if self._mw_paused:
                self._mw_wait_resumed()
                continue
            if time.monotonic() - self._mw_rescued_at >= RESCUE_EVERY:
                self._mw_rescue()
            step = max(1, min(timeout, DRAIN_POLL))
            if max_idle_time is not None:
                left = max_idle_time - (time.monotonic() - idle_since)
                if left <= 0:
                    return None
                step = max(1, min(step, math.ceil(left)))
            result = dequeue(step, step)
            if result is not None:
                if not (self._mw_paused or self._mw_draining):
                    return self._mw_in_hand(result)
                self._mw_put_back(*result)

    def _mw_in_hand(self, result: Any) -> Any:
        """A dequeued job is in hand from here (a kill before it starts puts it back)."""
        with self._mw_end_lock:
            self._mw_hold_if_killing()
            if result is not None:
                self._mw_current = result
        return result

    def _mw_before_dequeue(self) -> None:
        """Before taking a job: nothing here (the job's end was judged already)."""

    def _mw_put_back(self, job: Job, queue: Queue, execution: Any = None) -> None:
        """A job taken and not started (intake stopped, or a kill came first): back to the
        front of its queue, as it was; no kill is counted against it."""
        queued = self.connection.lpos(queue.key, job.id) is not None
        with self.connection.pipeline() as pipe:
            if execution is not None:
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            if not queued:
                queue.push_job_id(job.id, pipeline=pipe, at_front=True)
            pipe.execute()
        if self.warden is not None:
            self.warden.journal.write(
                "put_back", job=job.func_name, job_id=job.id, queue=queue.name, framework="rq"
            )
        log.info("memwarden: RQ job %s [%s] taken as intake stopped: back", job.func_name, job.id)

    def _mw_wait_resumed(self) -> None:
        """Idle (heartbeating) while intake is paused; a drain or RQ's stop ends the wait."""
        self.procline("memwarden: paused, memory over the soft limit")  # type: ignore[no-untyped-call]
        beat = time.monotonic()
        while self._mw_paused and not self._mw_draining and not self._stop_requested:
            if time.monotonic() - beat >= HEARTBEAT_EVERY:
                beat = time.monotonic()
                self.heartbeat()
            time.sleep(0.05)

    def _mw_wait_drained(self) -> None:
        """Idle (heartbeating) until the restart action arrives: RQ's stop signal raises
        ``StopRequested`` in here, the exit restart ends the process."""
        self._mw_parked = True
        self.set_state(WorkerStatus.IDLE)
        self.procline("memwarden: drained, waiting for the restart")  # type: ignore[no-untyped-call]
        while not self._stop_requested:
            self.heartbeat()
            time.sleep(0.5)
        return None

    def _mw_before_kill(self, in_flight: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Judge the job in hand at the kill instant, and return the kill record's
        ``in_flight``: exactly the jobs that die with it and count towards poison."""
        with self._mw_kill_lock:
            if self._mw_kill_target is not None:
                return None
            target = "horse" if self._mw_horse_kill_suffices() else "all"
            self._mw_kill_target = self._mw_last_kill = target
        if target == "horse":
            return self._mw_kill_horse_first()
        with self._mw_end_lock:  # no job's end is recorded from here on
            self._mw_killing = True
        self._mw_stop_horse()
        counted = self._mw_settle()
        with contextlib.suppress(Exception):
            self.register_death()  # type: ignore[no-untyped-call]
        return {"in_flight": counted}

    def _mw_settle(self) -> list[dict[str, Any]]:
        """The job in hand at a whole-worker kill: re-enqueued and counted if it started and
        did not end, put back uncounted if it never started, left alone if it ended."""
        current = self._mw_current
        if current is None:
            return []
        job, queue = current
        status = _status(job)
        if status == JobStatus.QUEUED:
            self._mw_put_back(job, queue, self._mw_execution())
            return []
        if status != JobStatus.STARTED:
            return []  # it ended (finished, failed, retried) before the kill
        self._mw_requeue_or_quarantine(job, queue, self._mw_execution(), "watchdog")
        return [{"job": job.func_name, "job_id": job.id, "queue": queue.name}]

    def _mw_kill_horse_first(self) -> dict[str, Any]:
        return {}

    def _mw_stop_horse(self) -> None:
        """Before a whole-worker kill is judged: the work horse, if any, dies first."""

    def _mw_horse_kill_suffices(self) -> bool:
        return False

    def _mw_kill(self) -> None:
        kill_tree_and_self()

    def _mw_execution(self) -> Any:
        with contextlib.suppress(Exception):
            return self.execution
        return None

    # ----------------------------------------------------------------- jobs left behind
    def clean_registries(self) -> None:
        """RQ's maintenance (at start, then every ``maintenance_interval``), after our
        rescue: RQ would fail the jobs of a dead worker as abandoned."""
        if self.warden is not None:
            self._mw_rescue()
        super().clean_registries()  # type: ignore[no-untyped-call]

    @_hook_guard
    def _mw_rescue(self) -> None:
        """Jobs of a worker that died without memwarden's kill (the kernel's OOM killer, a
        crash) go back to their queue, counted as kills: at once when that worker ran on
        this host and its process is gone, else once its execution's heartbeat expired."""
        self._mw_rescued_at = time.monotonic()
        with signals_held(STOP_SIGNALS):
            for queue in self.queues:
                registry = queue.started_job_registry
                now = time.time()
                for entry, score in self.connection.zrange(registry.key, 0, -1, withscores=True):
                    self._mw_rescue_one(queue, registry.key, entry, score < now)

    def _mw_rescue_one(self, queue: Queue, key: str, entry: bytes, expired: bool) -> None:
        job_id, execution_id = parse_composite_key(entry.decode())
        try:
            execution = Execution.fetch(execution_id, job_id, self.connection)
        except ValueError:  # its hash expired with its heartbeat
            execution = Execution(execution_id, job_id, self.connection)
        if not expired and not self._mw_worker_dead(execution.worker_name):
            return
        if not self.connection.zrem(key, entry):
            return  # another worker took it first
        try:
            job = Job.fetch(job_id, connection=self.connection, serializer=self.serializer)
        except NoSuchJobError:
            return
        if job.get_status() == JobStatus.STARTED:  # else RQ's own leftover, not abandoned
            self._mw_requeue_or_quarantine(job, queue, execution, "rescue")

    def _mw_worker_dead(self, name: str) -> bool:
        """True when the worker ``name`` is known gone: its key expired or says it died, or
        it ran on this host and its process is no more (or is now ours)."""
        if not name or name == self.name:
            return False
        key = self.redis_worker_namespace_prefix + name
        data = self.connection.hgetall(key)
        if not data or b"death" in data:
            return True
        host, pid = data.get(b"hostname"), data.get(b"pid")
        if not pid or host is None or host.decode() != self.hostname:
            return False
        return int(pid) == os.getpid() or not alive(int(pid))

    # ----------------------------------------------------------------- the way back
    def _mw_requeue_or_quarantine(self, job: Job, queue: Queue, execution: Any, by: str) -> None:
        """Count a hard kill against ``job``; re-enqueue it, or fail it as poison."""
        assert self.poison is not None and self.warden is not None
        limit = self.poison.kills
        kills = self.poison.record_kill(job.id)
        fields = {
            "job": job.func_name,
            "job_id": job.id,
            "queue": queue.name,
            "kills": kills,
            "framework": "rq",
        }
        with self.connection.pipeline() as pipe:
            if execution is not None:
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
            if kills >= limit:
                # Status FAILED, the failed registry and a failure result (what rq info shows).
                record_job_failure(job, poison_reason(kills, limit), pipe)
            else:
                job.started_at = None
                job.ended_at = None
                queue._enqueue_job(job, pipeline=pipe)  # as RQ's own Job.retry does
            # Killed before RQ took it off its intermediate queue: take it off here, or RQ's
            # maintenance would fail it a minute later as "stuck".
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            pipe.execute()
        if kills >= limit:
            # The rest of RQ's own failure path: dependents (if they allow failures), and
            # the job's rate-limit slot (RQ 3).
            with contextlib.suppress(Exception):
                self._enqueue_dependents_safely(queue, job)
            with contextlib.suppress(Exception):
                self._release_slot_safely(job)
            self.warden.quarantined(
                job.func_name, job.id, kills, reason=poison_reason(kills, limit), queue=queue.name
            )
        else:
            self.warden.journal.write("requeue", by=by, **fields)
            log.warning(
                "memwarden: RQ job %s [%s] interrupted by a hard kill (%d of %d): re-enqueued",
                job.func_name,
                job.id,
                kills,
                limit,
            )


class Worker(WardenMixin, rq.Worker):
    """``rq.Worker`` guarded by memwarden: ``rq worker -w memwarden.rq.Worker``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mw_report: int = -1  # read end of the horse's report pipe (parent)
        self._mw_report_w: int = -1  # write end (horse)
        self._mw_wait: tuple[int | None, int | None, Any] = (None, None, None)
        self._mw_horse_killed: str | None = None  # job id whose horse we killed
        self._mw_horse_gone = False  # the horse we meant to kill had ended already
        self._mw_horse_unstarted: str | None = None  # job id whose horse died before it began
        self._mw_oom_at_fork: int | None = None  # the cgroup's OOM kills as the horse began

    def _mw_hooks(self) -> Hooks:
        hooks = super()._mw_hooks()
        hooks.recycle = self._mw_recycle
        # A restart takes off the parent's memory only: the horse's goes with its job (or
        # with its kill at the hard limit). So a restart the policy wants while the parent
        # alone is under the soft limit waits (intake stays paused): the parent serves on
        # once the horse has ended. Without this a horse growing fast, or holding much for
        # long, drained and ended a healthy parent.
        hooks.holds_elsewhere = self._mw_horse_holds_it
        return hooks

    def _mw_horse_holds_it(self, total: int) -> bool:
        """True when a horse is alive and the parent alone is under the soft limit: a
        restart of the parent would free its own memory only, and the horse's goes with its
        job. The parent's own figure, not ``total`` less the horse's: read a moment after
        ``total``, a horse freeing its memory or leaving reads less than ``total`` counted,
        and the difference was taken for the parent's (a restart at 118 MiB for a 200 MiB
        horse, in CI)."""
        horse, warden = self.horse_pid, self.warden
        soft = None if warden is None else warden.state.limits.soft
        if not horse or soft is None:
            return False
        own = smaps_rollup(os.getpid())
        return own is not None and own.pss < soft

    # ----------------------------------------------------------------- parent
    def _mw_after_job(self) -> None:
        self._mw_after_horse()

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        if self.warden is None:
            super().fork_work_horse(job, queue)
            return
        self._mw_wait = (None, None, None)
        try:
            self._mw_report, self._mw_report_w = os.pipe()
        except OSError as exc:  # out of fds: run the job without its report
            log.warning("memwarden: no report pipe for the horse: %s", exc)
            super().fork_work_horse(job, queue)
            return
        # The parent's objects are left out of its collections while the horse lives (and
        # out of the horse's): a collection writes every object it visits, and each page
        # it writes is copied from the horse's — a reclaim in the parent would add the
        # parent's whole Python heap to the worker's memory at once.
        gc.freeze()
        oom = self.warden.oom
        self._mw_oom_at_fork = oom.count() if oom is not None else None
        try:
            super().fork_work_horse(job, queue)  # the horse never returns from here
        finally:
            os.close(self._mw_report_w)
            self._mw_report_w = -1

    def wait_for_horse(self) -> tuple[int | None, int | None, Any]:
        result = super().wait_for_horse()
        if result[0]:
            self._mw_wait = result
        return result

    def _mw_comes_back(self, job: Job, queue: Queue, execution: Any) -> bool:
        """A horse killed with its job in flight — by us, or by the kernel's OOM killer
        (SIGKILL while the cgroup counted an OOM kill): the job is re-enqueued (or
        quarantined), not failed as "work-horse terminated unexpectedly"."""
        if self._mw_horse_unstarted is not None and job.id == self._mw_horse_unstarted:
            self._mw_horse_unstarted = None
            self._mw_put_back(job, queue, execution)
            return True
        if self._mw_horse_killed is not None and job.id == self._mw_horse_killed:
            self._mw_horse_killed = None
            by = "parent"
        elif (
            self._mw_current is not None
            and self._mw_current[0].id == job.id
            and (self._mw_oom_killed_horse())
        ):
            by = "oom_kill"
        else:
            return False
        try:
            self._mw_requeue_or_quarantine(job, queue, execution, by)
            return True
        except Exception:
            log.exception("memwarden: could not re-enqueue RQ job %s; RQ fails it", job.id)
            return False

    def _mw_oom_killed_horse(self) -> bool:
        status = self._mw_wait[1]
        warden, before = self.warden, self._mw_oom_at_fork
        if status is None or warden is None or warden.oom is None or before is None:
            return False
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            return False
        after = warden.oom.count()
        return after is not None and after > before

    @_hook_guard
    def _mw_after_horse(self) -> None:
        """Back in the parent with the horse reaped: its report, its peak, re-arm after a kill.
        RQ's stop signal can land here (the worker is idle again, so its handler raises
        ``StopRequested``): held until this is done, then it goes on to RQ."""
        self._mw_hold_if_killing()
        gc.unfreeze()
        with signals_held(STOP_SIGNALS):
            self._mw_read_horse()

    def _mw_read_horse(self) -> None:
        assert self.warden is not None
        report: dict[str, Any] = {}
        if self._mw_report >= 0:
            try:
                os.set_blocking(self._mw_report, False)
                data = os.read(self._mw_report, 65536)
                report = json.loads(data) if data else {}
            except (OSError, ValueError):
                report = {}
            finally:
                os.close(self._mw_report)
                self._mw_report = -1
        pid, status, rusage = self._mw_wait
        self._mw_wait = (None, None, None)
        if report:
            if rusage is not None:
                report["peak_rss"] = int(rusage.ru_maxrss) * 1024  # a PEAK, KiB on Linux
            if status is not None:
                report["exit_status"] = status
            report["worker_pid"] = os.getpid()
            self.warden.record_job(report)
        if self._mw_kill_target == "horse":
            if rusage is not None:
                log.warning(
                    "memwarden: horse %s killed at the hard limit (peak RSS %d MiB)",
                    pid,
                    rusage.ru_maxrss // 1024,
                )
            self._mw_horse_killed = None
            with self._mw_kill_lock:
                self._mw_kill_target = None
            self.warden.recovered()

    @_hook_guard
    def _mw_before_dequeue(self) -> None:
        """Judge memory before taking a job: the parent may have grown since its watchdog's
        last reading (a horse's end is no reading of the parent). RQ's stop signal waits
        until this is done, as after the horse."""
        assert self.warden is not None
        with signals_held(STOP_SIGNALS):
            self.warden.check()

    # ----------------------------------------------------------------- horse
    def perform_job(self, job: Job, queue: Queue, execution: Any) -> bool:
        if not self.is_horse or self._mw_report_w < 0:
            return bool(super().perform_job(job, queue, execution))
        t0, before = time.perf_counter(), _own_rss()
        ok = False
        try:
            ok = bool(super().perform_job(job, queue, execution))
            return ok
        finally:
            self._mw_send_report(job, queue, before, time.perf_counter() - t0, ok)

    def _mw_send_report(self, job: Job, queue: Queue, before: int, took: float, ok: bool) -> None:
        with contextlib.suppress(Exception):
            record = {
                "pid": os.getpid(),
                "job": job.func_name,
                "job_id": job.id,
                "queue": queue.name,
                "rss_before": before,
                "rss_after": _own_rss(),
                "duration_s": round(took, 6),
                "ok": ok,
                "framework": "rq",
            }
            os.write(self._mw_report_w, json.dumps(record).encode())

    # ----------------------------------------------------------------- hooks
    def _mw_recycle(self, reason: str) -> bool:
        """A horse lives for one job: it is "recycled" when that job ends."""
        horse: int = self.horse_pid
        return horse > 0

    def _mw_horse_kill_suffices(self) -> bool:
        """True when the horse is alive and the parent alone is under the hard limit."""
        horse = self.horse_pid
        state = None if self.warden is None else self.warden.state
        if not horse or state is None or state.limits.hard is None:
            return False
        mem = _horse_memory(horse)
        if state.total is None or mem is None:
            return True
        return state.total - mem.pss < state.limits.hard

    def _mw_kill_horse_first(self) -> dict[str, Any]:
        """A horse-only kill: the horse dies here, before the kill is recorded, and its job
        counts (the parent re-enqueues it once it has reaped the horse) only if it had not
        ended. Its end is judged with no end recorded meanwhile."""
        current = self._mw_current
        horse = self.horse_pid
        with self._mw_end_lock:
            self._mw_horse_killed = current[0].id if current else None
            self._mw_horse_gone = not _kill_horse(horse)
            if self._mw_horse_gone:
                self._mw_horse_killed = None
                return {"target": "horse", "child_pid": horse, "in_flight": []}
            _wait_dead(horse)
            status = _status(current[0]) if current is not None else None
            if current is None or status != JobStatus.STARTED:
                self._mw_horse_killed = None
                if current is not None and status == JobStatus.QUEUED:  # never began
                    self._mw_horse_unstarted = current[0].id
                return {"target": "horse", "child_pid": horse, "in_flight": []}
            job, queue = current
        job_record = {"job": job.func_name, "job_id": job.id, "queue": queue.name}
        return {"target": "horse", "child_pid": horse, "in_flight": [job_record]}

    def _mw_stop_horse(self) -> None:
        horse = self.horse_pid
        if horse and _kill_horse(horse):
            _wait_dead(horse)

    def _mw_kill(self) -> None:
        if self._mw_last_kill != "horse":
            kill_tree_and_self()
            return
        if self._mw_horse_gone:  # it ended by itself: nothing of ours died, watch afresh
            with self._mw_kill_lock:
                self._mw_kill_target = None
            if self.warden is not None:
                self.warden.recovered()
        # else the parent, once it has reaped the horse, re-enqueues and recovers


class SimpleWorker(WardenMixin, rq.SimpleWorker):
    """``rq.SimpleWorker`` guarded by memwarden: jobs run in the worker's own process."""

    def perform_job(self, job: Job, queue: Queue, execution: Any) -> bool:
        if self.warden is None:
            return bool(super().perform_job(job, queue, execution))
        with self.warden.job(job.func_name or "?", job.id, queue=queue.name):
            return bool(super().perform_job(job, queue, execution))


def _status(job: Job) -> JobStatus | None:
    """The job's status in Redis now (None once the job is gone)."""
    try:
        return job.get_status(refresh=True)
    except Exception:  # deleted, or Redis gone: nothing to judge
        return None


def _kill_horse(pid: int) -> bool:
    """SIGKILL a work horse (and its own children, once it leads its process group: until
    it has called setpgrp the group is ours, so the horse alone). False if it is gone."""
    if not pid:
        return False
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False


def _wait_dead(pid: int, timeout: float = 5.0) -> None:
    """Until ``pid`` (our child) has died — without reaping it: RQ's loop does that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return
        except ChildProcessError:
            return  # reaped already
        time.sleep(0.002)
