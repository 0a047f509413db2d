"""Huey: ``memwarden.huey.guard(huey, **options)`` keeps a consumer inside its quota.

Records come from Huey's ``pre_execute``/``post_execute`` hooks (task name and id). The
warden lives in the process that runs the tasks and starts with the consumer's workers
(``on_startup``), never in a process that only enqueues.

- **thread / greenlet workers**: one warden for the consumer. Pause (memory over the soft
  limit) and drain both hold the fetch (the guard's ``dequeue`` returns nothing), running
  tasks go on; a pause ends when memory falls back under the limit, a drain with the
  restart action (default SIGTERM; the consumer exits and its supervisor starts it again).
- **process workers**: a warden in each worker child. The parent never runs a task, so the
  remedy is the child: the child holding the most memory answers for the consumer's total
  (the others judge only their own RSS); it recycles by leaving at its next fetch, after
  its current task, and the consumer's health check forks a fresh one. The others hold
  their fetch too while the consumer's total (read by each watchdog) is over the soft
  limit: the pause is the consumer's. Each child leaves the objects it inherited from the
  consumer out of its collections (``gc.freeze``): a collection writes what it visits, and
  a reclaim would otherwise copy the consumer's heap into the child. A hard kill is this
  child's own (it runs a warden; the consumer and its scheduler run none, and a kill left
  to them is the kernel's). A child, or the scheduler, whose consumer was killed outright
  leaves (a worker after its task in hand) instead of taking tasks beside the next one.

A task taken by a fetch that was under way when intake stopped goes back to the front of
the queue (a pause) or through the schedule (a drain: see below).

Huey deletes a task from its queue when a worker takes it, so an interrupted task would be
lost: the guard re-enqueues it on ``SIGNAL_INTERRUPTED`` and, before a hard kill, every
task in flight. A task that was running at ``poison_kills`` hard kills is quarantined
instead (a Redis list, a ``quarantine`` journal record), and the other tasks carry on.
Only tasks started (memwarden's pre-execute hook run) and not ended (its post-execute hook
run) at the kill count; a task taken and not started goes back uncounted.

With Redis storage a kill memwarden does not make (the kernel's OOM killer, a crash) loses
nothing either: a worker takes a task by an atomic move into its own list in Redis
(:class:`TaskLedger`) and the next worker puts back what a dead one held.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Unpack

import redis
from huey.api import Huey, Task
from huey.exceptions import TaskTimeout
from huey.signals import SIGNAL_INTERRUPTED
from huey.storage import RedisStorage
from huey.utils import normalize_time

from memwarden.config import Config, Options
from memwarden.gauges import Gauge, Sample
from memwarden.gauges.proc import alive, children_of, rss
from memwarden.integrations.shared import IntakeGuard, lease_loop
from memwarden.poison import PoisonJobs
from memwarden.setup import set_up
from memwarden.warden import Warden, kill_tree_and_self, swallow_but
from memwarden.wardens import being_killed, runs_warden, zombie

#: Huey's control flow from its signal handler (a task's timeout): it passes through.
HOST_CONTROL_FLOW: tuple[type[BaseException], ...] = (TaskTimeout,)
_hook_guard = swallow_but(*HOST_CONTROL_FLOW)

log = logging.getLogger("memwarden")

__all__ = ["HueyGuard", "LargestWorkerGauge", "guard"]

#: How long an idle fetch waits while draining (the consumer's own poll is ~0.1 s).
IDLE = 0.1
#: A task put back goes through Huey's schedule, due this many seconds later, so that no
#: thread of a consumer about to die can take it again (the next one's scheduler will).
PUT_BACK_DELAY = 2.0
#: Before a kill, how long to wait for fetches under way (Huey's Redis read timeout: 1 s),
#: where a task they bring would be lost: a storage without a :class:`TaskLedger`. With one
#: the kill does not wait (memory may reach the quota meanwhile): what they bring stays in
#: Redis and the next worker puts it back, uncounted.
FETCH_WAIT = 2.0
#: How long the mark "killed by memwarden" on a worker's held tasks waits for a rescuer (s).
KILLED_MARK_TTL = 86400
#: A worker process's lease on the tasks it holds (s), renewed every third of it.
LEASE = 10.0
#: How often a worker looks for tasks held by dead ones (s).
RESCUE_EVERY = 5.0
#: How long a worker thread waits for a kill under way before it ends the process itself.
KILL_WAIT = 30.0

#: Take ``data`` off list KEYS[1] (once) and push it onto KEYS[2] (the end huey pops): 1 if
#: it was there. A task handed back this way is never in both lists, nor in none.
HAND_BACK_LUA = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


class LargestWorkerGauge:
    """For a process-worker child: the consumer's total if this child is the largest worker,
    else only its own RSS. Exactly one child then acts on the total, and it is the one whose
    recycling frees the most. Only worker children count (those that run a warden): the
    scheduler, larger, would otherwise leave the total to nobody. A reading during which a
    sibling ended (its warden's hard kill) is judged by its own RSS only: the total still
    counts the dead one's memory, which no longer makes it larger than us."""

    def __init__(self, inner: Gauge, parent: int) -> None:
        self.inner = inner
        self.parent = parent
        self.source = inner.source
        #: The consumer's total at the last reading, whichever child is the largest.
        self.whole: int | None = None

    def read(self) -> Sample:
        me = os.getpid()
        # Which siblings were whole (not zombies) as the figure was read: one of them that
        # ends while it is read (a warden's kill of its own process, on a busy machine
        # anywhere between the two looks) is in the figure, and no longer larger than us.
        before = {pid: zombie(pid) for pid in children_of(self.parent) if pid != me}
        sample = self.inner.read()
        self.whole = sample.total
        mine = rss(me)
        others = [pid for pid in children_of(self.parent) if pid != me]
        if not self._ending(before, others) and all(
            rss(pid) <= mine or not runs_warden(pid) for pid in others
        ):
            return Sample(sample.t, sample.total, mine, sample.source)
        return Sample(sample.t, mine, mine, f"{sample.source}/own")

    @staticmethod
    def _ending(before: dict[int, bool], others: list[int]) -> bool:
        """A sibling was ending as the figure was read (gone since, or being killed now, and
        not a zombie already before): the figure still counts memory it is giving back.
        Judged whole, it would have an idle worker killed for a dead one's memory; the next
        reading, without it, is judged whole again."""
        for pid in {*before, *others}:
            if before[pid] if pid in before else zombie(pid):
                continue  # a zombie holds no memory: nothing of it was in the figure
            if pid not in others or being_killed(pid):
                return True
        return False


class TaskLedger:
    """The tasks one worker process holds, in Redis: a task is taken by an atomic move from
    the queue into this process's own list (``{prefix}:held:{owner}``) and taken off it as
    it ends or is handed back; a lease key (``{prefix}:lease:{owner}``, :data:`LEASE`)
    says the process lives. The tasks of a process that died without memwarden's kill
    are put back by another: at once when it ran on this host and its pid is gone, else
    once its lease ran out."""

    def __init__(self, storage: RedisStorage, prefix: str) -> None:
        self.storage = storage
        self.conn = storage.conn
        self.prefix = prefix
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.key = f"{prefix}:held:{self.owner}"
        self.lease_key = f"{prefix}:lease:{self.owner}"
        self.raw: dict[str, bytes] = {}  # task id -> the message as it sits in the list
        self._hand_back = self.conn.register_script(HAND_BACK_LUA)
        self._stop = threading.Event()

    @staticmethod
    def usable(storage: Any) -> bool:
        """A plain Redis list queue (not priorities, not SQL): what the move needs."""
        kind = type(storage)
        return kind.dequeue is RedisStorage.dequeue and kind.enqueue is RedisStorage.enqueue

    def take(self) -> bytes | None:
        """Huey's fetch (it pops the right end), moved into our list instead of dropped."""
        s = self.storage
        try:
            if s.blocking:
                data = self.conn.blmove(s.queue_key, self.key, s.read_timeout, "RIGHT", "LEFT")
            else:
                data = self.conn.lmove(s.queue_key, self.key, "RIGHT", "LEFT")
        except (redis.exceptions.TimeoutError, TypeError, IndexError):
            return None
        return data if isinstance(data, bytes) else None

    def holds(self, task_id: str, data: bytes) -> None:
        self.raw[task_id] = data

    def drop(self, data: bytes) -> None:
        self.conn.lrem(self.key, 1, data)

    def release(self, task_id: str) -> None:
        """The task ended, or went elsewhere: off our list."""
        data = self.raw.pop(task_id, None)
        if data is not None:
            self.conn.lrem(self.key, 1, data)

    def hand_back(self, task_id: str) -> bool:
        """Off our list and onto the head of the queue, in one step."""
        data = self.raw.pop(task_id, None)
        return data is not None and bool(
            self._hand_back(keys=[self.key, self.storage.queue_key], args=[data])
        )

    # ------------------------------------------------------------ lease and rescue
    def start(self, rescue: Callable[[], None]) -> None:
        """Renew the lease now and every third of it; call ``rescue`` now and every
        :data:`RESCUE_EVERY` seconds (a daemon thread of this process)."""
        self._renew()
        rescue()
        threading.Thread(
            target=lease_loop,
            args=(self._stop, self._renew, rescue),
            kwargs={"lease": LEASE, "rescue_every": RESCUE_EVERY, "what": "huey"},
            name="memwarden-lease",
            daemon=True,
        ).start()

    def _renew(self) -> None:
        self.conn.set(self.lease_key, 1, px=int(LEASE * 1000))

    def stop(self) -> None:
        self._stop.set()
        self.conn.delete(self.lease_key)

    def killed(self) -> None:
        """Mark this process as killed by memwarden, once the tasks it ran were dealt
        with: what its list still holds came from a fetch under way, never started."""
        self.conn.set(self._killed_key(self.owner), 1, ex=KILLED_MARK_TTL)

    def _killed_key(self, owner: str) -> str:
        return f"{self.prefix}:killed:{owner}"

    def orphans(self) -> list[tuple[str, bool]]:
        """Lists of dead processes, each moved under a private name of ours (so that two
        rescuers never both take one); returns those names, each with whether its tasks
        count a kill (not when memwarden's kill dealt with the ones that were running)."""
        taken = []
        start = len(f"{self.prefix}:held:")
        for raw_key in self.conn.scan_iter(match=f"{self.prefix}:held:*", count=1000):
            key = raw_key.decode()
            owner = key[start:].split(":rescue:")[0]
            if owner == self.owner or not self._dead(owner):
                continue
            mine = f"{self.key}:rescue:{uuid.uuid4().hex[:8]}"
            try:
                self.conn.rename(key, mine)
            except redis.exceptions.ResponseError:
                continue  # taken by another rescuer, or empty now
            counted = key != f"{self.prefix}:held:{owner}" or not self.conn.delete(
                self._killed_key(owner)
            )
            taken.append((mine, counted))
        return taken

    def _dead(self, owner: str) -> bool:
        if not self.conn.exists(f"{self.prefix}:lease:{owner}"):
            return True
        host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        return host == socket.gethostname() and pid.isdigit() and not alive(int(pid))

    def put_back_from(self, key: str, data: bytes) -> bool:
        return bool(self._hand_back(keys=[key, self.storage.queue_key], args=[data]))


class _Leave:
    """Restart action of a process-worker child: leave at the next fetch (it is drained)."""

    name = "leave"

    def __init__(self, guard: HueyGuard) -> None:
        self.guard = guard

    def restart(self, reason: str) -> None:
        self.guard.leaving = True


class HueyGuard(IntakeGuard):
    """The glue between one Huey instance and the warden of each process running its tasks."""

    def __init__(self, huey: Huey, poison: PoisonJobs | None = None, **options: Any) -> None:
        self.huey = huey
        self.options = options
        self.config = Config.from_env(**options)  # bad settings fail at import, clearly
        self.poison = poison if poison is not None else _poison_for(huey, self.config)
        self.quarantine_key = f"memwarden:huey:{huey.name}:quarantine"
        self.warden: Warden | None = None
        self.process_worker = False
        self.leaving = False
        self._pid = -1
        self._lock = threading.Lock()
        self._claimed: dict[str, Task] = {}  # taken from the queue, not finished
        self._started: set[str] = set()  # of those, the ones whose run began
        self._done: set[str] = set()  # of those, the ones that ended (hooks still running)
        self.killing = False  # a kill under way: no task starts or ends meanwhile
        self.ledger: TaskLedger | None = None
        self._fetching = 0  # threads inside the storage's (blocking) fetch
        self._handled: set[str] = set()  # re-enqueued or quarantined before a kill
        self._dequeue = huey.dequeue
        self._execute = huey.execute
        self._read_schedule = huey.read_schedule
        #: The consumer's process: it imports the app, then forks its workers and scheduler.
        self._home = os.getpid()

    # ------------------------------------------------------------ wiring
    def install(self) -> HueyGuard:
        huey = self.huey
        huey.dequeue = self.dequeue
        huey.execute = self.execute
        huey.read_schedule = self.read_schedule
        huey.on_startup(name="memwarden")(self.startup)
        huey.on_shutdown(name="memwarden")(self.shutdown)
        huey.pre_execute(name="memwarden")(self.pre_execute)
        huey.post_execute(name="memwarden")(self.post_execute)
        huey.signal(SIGNAL_INTERRUPTED)(self.interrupted)
        return self

    @_hook_guard
    def startup(self) -> None:
        """First worker of this process starting: make and start its warden."""
        with self._lock:
            if self.warden is not None and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._claimed, self._handled, self._fetching = {}, set(), 0
            self._started, self._done = set(), set()
            self.draining = self.leaving = self.paused = self.killing = False
            self.process_worker = multiprocessing.current_process().name != "MainProcess"
            hooks = self.hooks(recycle=self.recycle if self.process_worker else None)
            extra: dict[str, Any] = {}
            if self.process_worker:
                # Forked from the consumer, this child shares its pages until it writes
                # them, and a collection writes every object it visits: a reclaim here (or
                # Python's own full collection) would copy the consumer's whole heap into
                # the child, ~8 MiB, most of a small quota's gap between soft and hard. The
                # inherited objects are left out of this child's collections.
                gc.freeze()
                where = set_up(self.config)
                whole = where.gauge(self.config, root=os.getppid())
                extra.update(
                    quota=where.quota,
                    gauge=LargestWorkerGauge(whole, os.getppid()),
                    restarter=_Leave(self),
                )
            self.warden = Warden(self.config, hooks=hooks, framework="huey", **extra).start()
            log.info("memwarden: guarding huey %s: %r", self.huey.name, self.warden)
            storage = self.huey.storage
            if self.poison is not None and TaskLedger.usable(storage):
                self.ledger = TaskLedger(storage, self.poison.prefix)
        if self.ledger is not None:
            self.ledger.start(self.rescue)

    @_hook_guard
    def shutdown(self) -> None:
        """A worker stops (a clean exit): the lease goes, so that anything still held is
        put back by the next worker at once."""
        if self.ledger is not None and self._pid == os.getpid() and not self._claimed:
            self.ledger.stop()

    # ------------------------------------------------------------ taking and running
    def dequeue(self) -> Task | None:
        """Huey's fetch, held back while paused or draining; a process worker that must go
        leaves here, between tasks (huey ends a worker on KeyboardInterrupt without a word).
        A task that a fetch under way brings back once intake stopped goes back."""
        if self._pid != os.getpid():
            return self._dequeue()
        if self.process_worker and not self.leaving and self.orphaned():
            self.draining = self.leaving = True
            log.warning(
                "memwarden: huey worker %d: its consumer %d is gone; leaves after its task",
                os.getpid(),
                self._home,
            )
        if self.leaving and self.process_worker and not self._claimed:
            raise KeyboardInterrupt
        if self._held():
            time.sleep(IDLE)
            return None
        with self._lock:
            self._fetching += 1
        try:
            task = self._fetch()
            if task is None:
                return None
            with self._lock:
                if not self._held():
                    self._claimed[task.id] = task
                    return task
                if self.killing and self.ledger is not None:
                    return None  # left in our Redis list: the next worker puts it back
                # Under the lock: a kill judges what is in flight once this one is back.
                if self.draining:
                    self.put_back(task)  # taken as the drain began: back through the schedule
                else:
                    self.put_front(task)  # taken while the pause began: next in line
            return None
        finally:
            with self._lock:
                self._fetching -= 1

    def read_schedule(self, *args: Any, **kwargs: Any) -> Any:
        """Huey's scheduler loop; a scheduler process whose consumer is gone leaves here,
        before it moves anything (huey ends it on KeyboardInterrupt)."""
        if self.orphaned():
            log.warning("memwarden: huey scheduler %d: its consumer is gone; leaves", os.getpid())
            raise KeyboardInterrupt
        return self._read_schedule(*args, **kwargs)

    def orphaned(self) -> bool:
        """A process forked by the consumer (a process worker, the scheduler) whose
        consumer is gone (killed outright: nobody stopped it). Left alone it would go on
        taking tasks beside the consumer started in its place, and hold memory that one is
        judged by."""
        parent = multiprocessing.parent_process()
        return parent is not None and parent.pid == self._home and os.getppid() != self._home

    def _fetch(self) -> Task | None:
        ledger = self.ledger
        if ledger is None:
            return self._dequeue()
        data = ledger.take()
        if data is None:
            return None
        try:
            task = self.huey.deserialize_task(data)
        except Exception:
            ledger.drop(data)  # huey drops what it cannot read too (and says so)
            raise
        ledger.holds(task.id, data)
        return task

    def _held(self) -> bool:
        """Intake stopped: a drain, our own pause, or (a process worker) the consumer's
        total over the soft limit as this child's watchdog last read it."""
        return self.draining or self.paused or self._consumer_over()

    def _consumer_over(self) -> bool:
        warden = self.warden
        if not self.process_worker or warden is None:
            return False
        gauge, soft = warden.gauge, warden.state.limits.soft
        whole = gauge.whole if isinstance(gauge, LargestWorkerGauge) else None
        return soft is not None and whole is not None and whole >= soft

    def execute(self, task: Task, timestamp: Any = None) -> Any:
        try:
            return self._execute(task, timestamp)
        finally:
            if self._pid == os.getpid():
                self._settled(lambda: self._ended(task))

    def pre_execute(self, task: Task) -> None:
        if self._pid != os.getpid():
            return
        self._settled(lambda: self._started.add(task.id))
        if self.warden is not None:
            self.warden.job_started(task.name, task.id)

    def post_execute(self, task: Task, value: Any, exception: BaseException | None) -> None:
        """The task's run is over: it counts no more at a kill; it has ended for good
        unless huey still has to enqueue what follows it (a retry, ``then``, a chord)."""
        if self._pid != os.getpid():
            return
        follows = exception is not None or task.on_complete is not None or task.chord_config
        self._settled(lambda: self._started.discard(task.id) if follows else self._over(task))
        if self.warden is not None:
            self.warden.job_finished(task.id, **({"error": repr(exception)} if exception else {}))

    def _over(self, task: Task) -> None:
        """Its run is over for good: not put back at a kill, nor by a rescue; it stays in
        hand (a drain waits for it) until huey is done with it."""
        self._started.discard(task.id)
        self._done.add(task.id)
        if self.ledger is not None:
            with_swallowed(self.ledger.release, task.id)

    def _ended(self, task: Task) -> None:
        self._over(task)
        self._claimed.pop(task.id, None)
        self._done.discard(task.id)

    def _settled(self, change: Callable[[], object]) -> None:
        """Make ``change`` to what is in flight, unless a kill has judged it already: then
        this thread waits for the kill (the judgement stands)."""
        with self._lock:
            if not self.killing:
                change()
                return
        deadline = time.monotonic() + KILL_WAIT
        while time.monotonic() < deadline:
            time.sleep(0.05)
        kill_tree_and_self()

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

    def before_kill(self, in_flight: list[dict[str, Any]]) -> dict[str, Any]:
        """Just before the hard kill: every task taken and not ended back to the queue, or
        into quarantine if it was running at ``poison_kills`` kills. Only tasks running at
        this instant count (and make the kill record's ``in_flight``); one taken and not
        started goes back uncounted. The kill never waits for fetches under way (idle
        workers blocked in Redis for up to its read timeout, while the task that crossed
        the hard limit grows on): what they bring stays in this worker's Redis list and the
        next worker puts it back, uncounted (:meth:`TaskLedger.killed`). Only a storage
        without that list waits for them, at most :data:`FETCH_WAIT`."""
        self.draining = True
        deadline = time.monotonic() + FETCH_WAIT
        while self.ledger is None and self._fetching and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            self.killing = True  # no task starts or ends from here on
            tasks = [t for t in self._claimed.values() if t.id not in self._done]
            running = set(self._started)
        counted = []
        for task in tasks:
            self._handled.add(task.id)
            if task.id not in running:
                self.put_back(task)
                continue
            counted.append({"job": task.name, "job_id": task.id})
            kills = self.poison.record_kill(task.id) if self.poison is not None else 0
            if self.poison is not None and kills >= self.poison.kills:
                self.quarantine(task, kills)
            else:
                self.put_back(task)
                log.warning("memwarden: re-enqueued %s[%s] before the kill", task.name, task.id)
        if self.ledger is not None:
            with_swallowed(self.ledger.killed)
        return {"in_flight": counted}

    @_hook_guard
    def rescue(self) -> None:
        """Tasks held by worker processes that died without memwarden's kill: each counts
        one kill (it was running when its process died), then goes back to the head of
        the queue, or into quarantine at ``poison_kills``. Those left by memwarden's kill
        (brought by a fetch under way, never started) go back uncounted."""
        ledger = self.ledger
        if ledger is None:
            return
        for key, counted in ledger.orphans():
            for data in ledger.conn.lrange(key, 0, -1):
                self._rescue_one(ledger, key, data, counted)
            ledger.conn.delete(key)

    def _rescue_one(self, ledger: TaskLedger, key: str, data: bytes, counted: bool) -> None:
        try:
            task = self.huey.deserialize_task(data)
        except Exception:
            log.exception("memwarden: a held huey task cannot be read; left in %s", key)
            return
        poison = self.poison if counted else None
        kills = poison.record_kill(task.id) if poison is not None else 0
        fields = {"job": task.name, "job_id": task.id, "kills": kills, "framework": "huey"}
        if poison is not None and kills >= poison.kills:
            ledger.conn.lrem(key, 1, data)
            self.quarantine(task, kills)
        elif ledger.put_back_from(key, data):
            if self.warden is not None:
                self.warden.journal.write("requeue", by="rescue", **fields)
            log.warning(
                "memwarden: huey task %s[%s] %s: put back",
                task.name,
                task.id,
                "was running when its worker died" if counted else "taken as its worker was killed",
            )

    def put_back(self, task: Task) -> None:
        """Back to the queue through the schedule, due in :data:`PUT_BACK_DELAY` seconds."""
        task.eta = normalize_time(delay=PUT_BACK_DELAY, utc=self.huey.utc)
        self.huey.add_schedule(task)
        if self.ledger is not None:
            self.ledger.release(task.id)  # after: a task is never in no list at all

    def put_front(self, task: Task) -> None:
        """Back to the head of the queue, as if never taken (Redis: the end huey pops)."""
        storage = self.huey.storage
        data = self.huey.serialize_task(task)
        if self.ledger is not None:
            self.ledger.hand_back(task.id)
        elif type(storage).enqueue is RedisStorage.enqueue:  # a plain Redis list
            storage.conn.rpush(storage.queue_key, data)
        else:  # its own order (priorities, SQL): as the storage enqueues
            storage.enqueue(data, task.priority)
        if self.warden is not None:
            self.warden.journal.write("put_back", job=task.name, job_id=task.id, framework="huey")
        log.info("memwarden: huey task %s[%s] taken as intake paused: back", task.name, task.id)

    def quarantine(self, task: Task, kills: int) -> None:
        reason = f"running at {kills} hard kills: quarantined, not retried"
        if self.poison is not None:
            self.poison.redis.rpush(self.quarantine_key, self.huey.serialize_task(task))
        if self.ledger is not None:
            self.ledger.release(task.id)
        if self.warden is not None:
            self.warden.quarantined(
                task.name, task.id, kills, where=self.quarantine_key, reason=reason
            )

    @_hook_guard
    def interrupted(self, signal: str, task: Task) -> None:
        """Huey stopped this task half-way and has already dropped it: enqueue it again."""
        if self._pid != os.getpid() or task.id in self._handled:
            return
        self._handled.add(task.id)
        if self.warden is not None:
            self.warden.job_finished(task.id, interrupted=True)
        self.put_back(task)
        log.warning("memwarden: huey task %s[%s] interrupted: re-enqueued", task.name, task.id)


def with_swallowed(fn: Callable[..., object], *args: Any) -> None:
    """``fn(*args)``; an error is logged, never raised into huey's worker."""
    try:
        fn(*args)
    except Exception:
        log.exception("memwarden: %s failed (task unaffected)", getattr(fn, "__name__", fn))


def _poison_for(huey: Huey, config: Config) -> PoisonJobs | None:
    conn = getattr(huey.storage, "conn", None)
    if conn is None or not hasattr(conn, "pipeline"):
        log.warning("memwarden: huey storage is not Redis: no poison-job counting")
        return None
    return PoisonJobs(conn, kills=config.poison_kills, prefix=f"memwarden:huey:{huey.name}")


def guard(huey: Huey, *, poison: PoisonJobs | None = None, **options: Unpack[Options]) -> HueyGuard:
    """Guard ``huey``'s consumer. ``options`` are memwarden settings (``soft_limit="400MB"``,
    …), each also a ``MEMWARDEN_*`` env var; ``poison`` defaults to counting kills in the
    huey's own Redis."""
    return HueyGuard(huey, poison, **options).install()
