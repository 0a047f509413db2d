"""Huey: ``memwarden.huey.guard(huey, **options)`` keeps a consumer inside its quota.

Records come from Huey's ``pre_execute``/``post_execute`` hooks (task name and id). The
warden lives in the process that runs the tasks and starts with the consumer's workers
(``on_startup``), never in a process that only enqueues.

- **thread / greenlet workers**: one warden for the consumer. Drain stops fetching (the
  guard's ``dequeue`` returns nothing), running tasks finish, then the restart action
  (default SIGTERM; the consumer exits and its supervisor starts it again).
- **process workers**: a warden in each worker child. The parent never runs a task, so the
  remedy is the child: the child holding the most memory answers for the consumer's total
  (the others judge only their own RSS); it recycles by leaving at its next fetch, after
  its current task, and the consumer's health check forks a fresh one.

Huey deletes a task from its queue when a worker takes it, so an interrupted task would be
lost: the guard re-enqueues it on ``SIGNAL_INTERRUPTED`` and, before a hard kill, every
task in flight. A task that was running at ``poison_kills`` hard kills is quarantined
instead (a Redis list, a ``quarantine`` journal record), and the other tasks carry on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from typing import Any

from huey.api import Huey, Task
from huey.signals import SIGNAL_INTERRUPTED
from huey.utils import normalize_time

from memwarden.config import Config
from memwarden.gauges import Gauge, Sample, choose_gauge
from memwarden.gauges.cgroup import Cgroup
from memwarden.gauges.proc import children_of, rss
from memwarden.gauges.quota import detect_quota
from memwarden.poison import PoisonJobs
from memwarden.warden import Hooks, Warden, swallow

log = logging.getLogger("memwarden")

__all__ = ["HueyGuard", "LargestWorkerGauge", "guard"]

#: How long an idle fetch waits while draining (the consumer's own poll is ~0.1 s).
IDLE = 0.1
#: A task put back goes through Huey's schedule, due this many seconds later, so that no
#: thread of a consumer about to die can take it again (the next one's scheduler will).
PUT_BACK_DELAY = 2.0
#: Before a kill, how long to wait for fetches under way (Huey's Redis read timeout: 1 s).
FETCH_WAIT = 2.0


class LargestWorkerGauge:
    """For a process-worker child: the consumer's total if this child is the largest worker,
    else only its own RSS. Exactly one child then acts on the total, and it is the one whose
    recycling frees the most."""

    def __init__(self, inner: Gauge, parent: int) -> None:
        self.inner = inner
        self.parent = parent
        self.source = inner.source

    def read(self) -> Sample:
        sample = self.inner.read()
        me = os.getpid()
        mine = rss(me)
        if all(rss(pid) <= mine for pid in children_of(self.parent) if pid != me):
            return Sample(sample.t, sample.total, mine, sample.source)
        return Sample(sample.t, mine, mine, f"{sample.source}/own")


class _Leave:
    """Restart action of a process-worker child: leave at the next fetch (it is drained)."""

    name = "leave"

    def __init__(self, guard: HueyGuard) -> None:
        self.guard = guard

    def restart(self, reason: str) -> None:
        self.guard.leaving = True


class HueyGuard:
    """The glue between one Huey instance and the warden of each process running its tasks."""

    def __init__(self, huey: Huey, poison: PoisonJobs | None = None, **options: Any) -> None:
        self.huey = huey
        self.options = options
        self.config = Config.from_env(**options)  # bad settings fail at import, clearly
        self.poison = poison if poison is not None else _poison_for(huey, self.config)
        self.quarantine_key = f"memwarden:huey:{huey.name}:quarantine"
        self.warden: Warden | None = None
        self.process_worker = False
        self.draining = False
        self.leaving = False
        self._pid = -1
        self._lock = threading.Lock()
        self._claimed: dict[str, Task] = {}  # taken from the queue, not finished
        self._fetching = 0  # threads inside the storage's (blocking) fetch
        self._handled: set[str] = set()  # re-enqueued or quarantined before a kill
        self._dequeue = huey.dequeue
        self._execute = huey.execute

    # ------------------------------------------------------------ wiring
    def install(self) -> HueyGuard:
        huey = self.huey
        huey.dequeue = self.dequeue  # type: ignore[method-assign]
        huey.execute = self.execute  # type: ignore[method-assign]
        huey.on_startup(name="memwarden")(self.startup)
        huey.pre_execute(name="memwarden")(self.pre_execute)
        huey.post_execute(name="memwarden")(self.post_execute)
        huey.signal(SIGNAL_INTERRUPTED)(self.interrupted)
        return self

    @swallow
    def startup(self) -> None:
        """First worker of this process starting: make and start its warden."""
        with self._lock:
            if self.warden is not None and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._claimed, self._handled, self._fetching = {}, set(), 0
            self.draining = self.leaving = False
            self.process_worker = multiprocessing.current_process().name != "MainProcess"
            hooks = Hooks(
                drain=self.drain,
                in_flight=self.in_flight,
                before_kill=self.before_kill,
                recycle=self.recycle if self.process_worker else None,
            )
            extra: dict[str, Any] = {}
            if self.process_worker:
                cgroup = Cgroup.of_self()
                quota = detect_quota(os.environ, cgroup)
                whole = choose_gauge(self.config.measure, quota, cgroup, root=os.getppid())
                extra.update(
                    quota=quota,
                    gauge=LargestWorkerGauge(whole, os.getppid()),
                    restarter=_Leave(self),
                )
            self.warden = Warden(self.config, hooks=hooks, framework="huey", **extra).start()
            log.info("memwarden: guarding huey %s: %r", self.huey.name, self.warden)

    # ------------------------------------------------------------ taking and running
    def dequeue(self) -> Task | None:
        """Huey's fetch, held back while draining; a process worker that must go leaves
        here, between tasks (huey ends a worker on KeyboardInterrupt without a word)."""
        if self._pid != os.getpid():
            return self._dequeue()
        if self.leaving and self.process_worker and not self._claimed:
            raise KeyboardInterrupt
        if self.draining:
            time.sleep(IDLE)
            return None
        with self._lock:
            self._fetching += 1
        try:
            task = self._dequeue()
            if task is None:
                return None
            with self._lock:
                if not self.draining:
                    self._claimed[task.id] = task
                    return task
            self.put_back(task)  # taken while the drain began: back to the queue
            return None
        finally:
            with self._lock:
                self._fetching -= 1

    def execute(self, task: Task, timestamp: Any = None) -> Any:
        try:
            return self._execute(task, timestamp)
        finally:
            if self._pid == os.getpid():
                with self._lock:
                    self._claimed.pop(task.id, None)

    @swallow
    def pre_execute(self, task: Task) -> None:
        if self.warden is not None:
            self.warden.job_started(task.name, task.id)

    @swallow
    def post_execute(self, task: Task, value: Any, exception: BaseException | None) -> None:
        if self.warden is not None:
            self.warden.job_finished(task.id, **({"error": repr(exception)} if exception else {}))

    # ------------------------------------------------------------ the warden's hooks
    def drain(self) -> None:
        self.draining = True
        log.warning("memwarden: huey worker %d draining: no new tasks", os.getpid())

    def recycle(self, reason: str) -> bool:
        self.draining = self.leaving = True
        log.warning("memwarden: huey worker %d leaves after its task: %s", os.getpid(), reason)
        return True

    def in_flight(self) -> list[dict[str, Any]]:
        """Tasks taken and not finished; while draining, a fetch under way counts too (what
        it brings back is put back before it ends)."""
        with self._lock:
            jobs = [{"job": t.name, "job_id": t.id} for t in self._claimed.values()]
            if self.draining and self._fetching:
                jobs.append({"job": "(fetching)", "job_id": None})
            return jobs

    def before_kill(self, in_flight: list[dict[str, Any]]) -> None:
        """Just before the hard kill: every task in flight back to the queue, or into
        quarantine if it was running at ``poison_kills`` kills. Fetches under way end first
        (at most the storage's read timeout), so no task is taken and then lost."""
        self.draining = True
        deadline = time.monotonic() + FETCH_WAIT
        while self._fetching and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            tasks = list(self._claimed.values())
        for task in tasks:
            kills = self.poison.record_kill(task.id) if self.poison is not None else 0
            if self.poison is not None and kills >= self.poison.kills:
                self.quarantine(task, kills)
            else:
                self.put_back(task)
                log.warning("memwarden: re-enqueued %s[%s] before the kill", task.name, task.id)
            self._handled.add(task.id)

    def put_back(self, task: Task) -> None:
        """Back to the queue through the schedule, due in :data:`PUT_BACK_DELAY` seconds."""
        task.eta = normalize_time(delay=PUT_BACK_DELAY, utc=self.huey.utc)
        self.huey.add_schedule(task)

    def quarantine(self, task: Task, kills: int) -> None:
        reason = f"running at {kills} hard kills: quarantined, not retried"
        if self.poison is not None:
            self.poison.redis.rpush(self.quarantine_key, self.huey.serialize_task(task))
        if self.warden is not None:
            self.warden.journal.write(
                "quarantine",
                job=task.name,
                job_id=task.id,
                kills=kills,
                reason=reason,
                framework="huey",
                where=self.quarantine_key,
            )
        log.error(
            "memwarden: huey task %s[%s] %s (%s)", task.name, task.id, reason, self.quarantine_key
        )

    @swallow
    def interrupted(self, signal: str, task: Task) -> None:
        """Huey stopped this task half-way and has already dropped it: enqueue it again."""
        if self._pid != os.getpid() or task.id in self._handled:
            return
        self._handled.add(task.id)
        if self.warden is not None:
            self.warden.job_finished(task.id, interrupted=True)
        self.put_back(task)
        log.warning("memwarden: huey task %s[%s] interrupted: re-enqueued", task.name, task.id)


def _poison_for(huey: Huey, config: Config) -> PoisonJobs | None:
    conn = getattr(huey.storage, "conn", None)
    if conn is None or not hasattr(conn, "pipeline"):
        log.warning("memwarden: huey storage is not Redis: no poison-job counting")
        return None
    return PoisonJobs(conn, kills=config.poison_kills, prefix=f"memwarden:huey:{huey.name}")


def guard(huey: Huey, *, poison: PoisonJobs | None = None, **options: Any) -> HueyGuard:
    """Guard ``huey``'s consumer. ``options`` are memwarden settings (``soft_limit="400MB"``,
    …), each also a ``MEMWARDEN_*`` env var; ``poison`` defaults to counting kills in the
    huey's own Redis."""
    return HueyGuard(huey, poison, **options).install()
