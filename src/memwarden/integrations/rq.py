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
- Over the soft limit: reclaim, then (``Worker``) let the horse end with its job, then after
  the grace time drain — take no new job, the current one finishes, an idle worker leaves
  its (stepped) blocking dequeue — and restart through the configured action (default:
  SIGTERM to ourselves, RQ's own warm shutdown). Something must start the worker again:
  ``rq worker-pool``, ``memwarden run``, the dyno manager, Kubernetes, systemd.
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
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import rq
from rq.exceptions import StopRequested
from rq.job import Job
from rq.job_lifecycle import record_job_failure
from rq.queue import Queue
from rq.worker import WorkerStatus

from memwarden.config import Config
from memwarden.gauges.proc import self_rss, smaps_rollup
from memwarden.poison import PoisonJobs
from memwarden.units import SettingError
from memwarden.warden import Hooks, Warden, kill_tree_and_self, signals_held, swallow_but

log = logging.getLogger("memwarden")

#: Longest single blocking dequeue (seconds): how soon an idle worker sees a drain.
DRAIN_POLL = 5

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


class WardenMixin:
    """The warden's side of an RQ worker; mixed into ``rq.Worker`` and ``rq.SimpleWorker``."""

    #: Options for the Warden (keyword names of ``Config``), for subclasses.
    memwarden_options: dict[str, Any] = {}

    # Attributes of rq's BaseWorker this mixin uses (for the type checker).
    connection: Any
    name: str
    log: logging.Logger
    _stop_requested: bool

    def __init__(
        self,
        *args: Any,
        memwarden: dict[str, Any] | None = None,
        warden: Warden | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._mw_options = {**self.memwarden_options, **(memwarden or {})}
        if warden is None:
            Config.from_env(**self._mw_options)  # a bad setting stops us now, naming it
        self._mw_given = warden
        self.warden: Warden | None = None
        self.poison: PoisonJobs | None = None
        self._mw_current: tuple[Job, Queue] | None = None
        self._mw_draining = False
        self._mw_parked = False  # drained and out of RQ's dequeue: safe to stop
        self._mw_kill_lock = threading.Lock()
        self._mw_kill_target: str | None = None  # "horse" or "all" once a kill is decided

    def execute_job(self, job: Job, queue: Queue) -> None:
        if self.warden is None:
            return super().execute_job(job, queue)  # type: ignore[misc]
        self._mw_current = (job, queue)
        try:
            return super().execute_job(job, queue)  # type: ignore[misc]
        finally:
            self._mw_current = None
            self._mw_after_job()

    def _mw_after_job(self) -> None:
        """After ``execute_job``: the forking worker reads its horse's report here."""

    # ----------------------------------------------------------------- set-up
    def _mw_hooks(self) -> Hooks:
        return Hooks(
            drain=self._mw_drain,
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
                self.warden.hooks = self._mw_hooks()
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
            return bool(super().work(*args, **kwargs))  # type: ignore[misc]
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

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> Any:
        """RQ's blocking dequeue, in steps of at most ``DRAIN_POLL`` seconds so a drain is seen
        between two steps (never by interrupting one: a job popped by a cut-off dequeue
        would sit in RQ's intermediate queue and be failed a minute later)."""
        dequeue = super().dequeue_job_and_maintain_ttl  # type: ignore[misc]
        if self.warden is None or timeout is None:  # unguarded, or burst mode (no blocking)
            return dequeue(timeout, max_idle_time)
        idle_since = time.monotonic()
        while True:
            if self._mw_draining:
                return self._mw_wait_drained()
            step = max(1, min(timeout, DRAIN_POLL))
            if max_idle_time is not None:
                left = max_idle_time - (time.monotonic() - idle_since)
                if left <= 0:
                    return None
                step = max(1, min(step, math.ceil(left)))
            result = dequeue(step, step)
            if result is not None:
                return result

    def _mw_wait_drained(self) -> None:
        """Idle (heartbeating) until the restart action arrives: RQ's stop signal raises
        ``StopRequested`` in here, the exit restart ends the process."""
        self._mw_parked = True
        self.set_state(WorkerStatus.IDLE)  # type: ignore[attr-defined]
        self.procline("memwarden: drained, waiting for the restart")  # type: ignore[attr-defined]
        while not self._stop_requested:
            self.heartbeat()  # type: ignore[attr-defined]
            time.sleep(0.5)
        return None

    def _mw_before_kill(self, in_flight: list[dict[str, Any]]) -> dict[str, Any] | None:
        with self._mw_kill_lock:
            if self._mw_kill_target is not None:
                return None
            self._mw_kill_target = "horse" if self._mw_horse_kill_suffices() else "all"
            if self._mw_kill_target == "horse":
                # The parent re-enqueues once it has reaped the horse.
                return {"target": "horse", "child_pid": self.horse_pid}
            current = self._mw_current
            if current is not None:
                job, queue = current
                self._mw_requeue_or_quarantine(job, queue, self._mw_execution(), "watchdog")
            with contextlib.suppress(Exception):
                self.register_death()  # type: ignore[attr-defined]
        return None

    def _mw_horse_kill_suffices(self) -> bool:
        return False

    def _mw_kill(self) -> None:
        kill_tree_and_self()

    def _mw_execution(self) -> Any:
        with contextlib.suppress(Exception):
            return self.execution  # type: ignore[attr-defined]
        return None

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
                self.cleanup_execution(job, pipeline=pipe, execution=execution)  # type: ignore[attr-defined]
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
                self._enqueue_dependents_safely(queue, job)  # type: ignore[attr-defined]
            with contextlib.suppress(Exception):
                self._release_slot_safely(job)  # type: ignore[attr-defined]
            self.warden.journal.write("poison", reason=poison_reason(kills, limit), **fields)
            log.error(
                "memwarden: RQ job %s [%s] quarantined in the failed registry after %d hard kills",
                job.func_name,
                job.id,
                kills,
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

    def _mw_hooks(self) -> Hooks:
        hooks = super()._mw_hooks()
        hooks.recycle = self._mw_recycle
        return hooks

    # ----------------------------------------------------------------- parent
    def _mw_after_job(self) -> None:
        self._mw_after_horse()

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        if self.warden is None:
            return super().fork_work_horse(job, queue)
        self._mw_wait = (None, None, None)
        try:
            self._mw_report, self._mw_report_w = os.pipe()
        except OSError as exc:  # out of fds: run the job without its report
            log.warning("memwarden: no report pipe for the horse: %s", exc)
            return super().fork_work_horse(job, queue)
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

    def handle_job_failure(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        if self._mw_horse_killed is not None and job.id == self._mw_horse_killed:
            self._mw_horse_killed = None
            try:
                self._mw_requeue_or_quarantine(job, queue, kwargs.get("execution"), "parent")
                return
            except Exception:
                log.exception("memwarden: could not re-enqueue RQ job %s; RQ fails it", job.id)
        super().handle_job_failure(job, queue, *args, **kwargs)

    @swallow_but(StopRequested)
    def _mw_after_horse(self) -> None:
        """Back in the parent with the horse reaped: its report, its peak, re-arm after a kill.
        RQ's stop signal can land here (the worker is idle again, so its handler raises
        ``StopRequested``): held until this is done, then it goes on to RQ."""
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
            self.warden.counts["jobs"] += 1
            if report.get("rss_after", 0) > report.get("rss_before", 0):
                self.warden.last_culprit = report.get("job")
            self.warden.journal.write("job", **report)
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
            self.warden.policy.did_recover()

    # ----------------------------------------------------------------- horse
    def perform_job(self, job: Job, queue: Queue, execution: Any) -> bool:
        if not self.is_horse or self._mw_report_w < 0:  # type: ignore[attr-defined]
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
        return self.horse_pid > 0

    def _mw_horse_kill_suffices(self) -> bool:
        """True when the horse is alive and the parent alone is under the hard limit."""
        horse = self.horse_pid
        warden = self.warden
        if not horse or warden is None or warden.limits.hard is None:
            return False
        sample = warden.last_sample
        mem = smaps_rollup(horse)
        if sample is None or mem is None:
            return True
        return sample.total - mem.pss < warden.limits.hard

    def _mw_kill(self) -> None:
        if self._mw_kill_target == "horse" and self.horse_pid:
            current = self._mw_current
            self._mw_horse_killed = current[0].id if current else None
            horse = self.horse_pid
            try:
                # The horse leads its own process group (taking its children along) once it
                # has called setpgrp; until then the group is ours: kill the horse alone.
                if os.getpgid(horse) == horse:
                    os.killpg(horse, signal.SIGKILL)
                else:
                    os.kill(horse, signal.SIGKILL)
                return
            except OSError:
                pass  # gone already: it ended by itself; nothing of ours in flight
            self._mw_horse_killed = None
            with self._mw_kill_lock:
                self._mw_kill_target = None
            if self.warden is not None:
                self.warden.policy.did_recover()
            return
        kill_tree_and_self()


class SimpleWorker(WardenMixin, rq.SimpleWorker):
    """``rq.SimpleWorker`` guarded by memwarden: jobs run in the worker's own process."""

    def perform_job(self, job: Job, queue: Queue, execution: Any) -> bool:
        if self.warden is None:
            return bool(super().perform_job(job, queue, execution))
        with self.warden.job(job.func_name, job.id, queue=queue.name):
            return bool(super().perform_job(job, queue, execution))
