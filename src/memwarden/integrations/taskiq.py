"""Taskiq: ``broker.add_middlewares(memwarden.taskiq.MemoryWarden(**options))``.

One :class:`~memwarden.warden.Warden` per ``taskiq worker`` process, built when the worker
starts its broker (the middleware does nothing in a client that only sends tasks).

- Records: ``pre_execute`` / ``post_execute`` give one ``job`` record per task (its name,
  ``task_id``, queue); the tasks between them are the warden's in-flight list.
- Pause (memory over the soft limit): the broker's ``listen`` is wrapped; while paused the
  worker reads no new message (the running tasks go on) and reads again once memory is back
  under the limit.
- Drain and restart: intake stops, the running tasks finish (``shutdown_timeout``), then
  SIGTERM to this worker process: taskiq's own graceful stop; ``taskiq worker``'s process
  manager starts a fresh process within a second (unless ``--max-fails`` is reached). At
  any stop (ours or the platform's, noted as it comes), messages read and not begun go back
  to the queue (taskiq would drop them).
- Hard kill: one kill is counted against every task running at that instant
  (:class:`PoisonJobs`, Redis), then every message this worker holds goes back to its queue
  before the SIGKILL: on ``RedisStreamBroker`` each pending entry of its consumer is added
  again and acknowledged (at once, not after ``idle_timeout``); on ``ListQueueBroker`` the
  messages read and not finished are set aside, and the next worker to start pushes them
  back. A message whose task was running at ``poison_kills`` kills is quarantined when it
  comes back: never run, kept in ``memwarden:taskiq:{queue}:quarantine``, a failed result.
- A death memwarden does not cause (the kernel's OOM killer, a crash), ``RedisStreamBroker``:
  a guarded worker rescues the consumer of a dead one (:mod:`.taskiq_redis`); a
  ``ListQueueBroker``'s messages are lost. :func:`loss_notes` says which settings can lose
  a task (``memwarden check --taskiq-broker`` and the worker's log at start print them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncGenerator, Callable
from typing import Any, Unpack, cast

import redis
from taskiq import AckableMessage, TaskiqMessage, TaskiqMiddleware, TaskiqResult

from memwarden.config import Config, Options
from memwarden.integrations.shared import IntakeGuard, lease_loop
from memwarden.integrations.taskiq_redis import (
    LEASE,
    RESCUE_EVERY,
    StreamConsumers,
    broker_kind,
    loss_notes,
    no_loss_problems,
    redelivery_note,
)
from memwarden.poison import PoisonJobs
from memwarden.units import SettingError
from memwarden.warden import Warden, swallow_but

#: Taskiq's control flow (asyncio's CancelledError, its KeyboardInterrupt on a hard stop)
#: derives from BaseException: no hook boundary catches it. Declared for the contract.
HOST_CONTROL_FLOW: tuple[type[BaseException], ...] = ()
_hook_guard = swallow_but(*HOST_CONTROL_FLOW)

log = logging.getLogger("memwarden")

__all__ = [
    "MemoryWarden",
    "check_app",
    "loss_notes",
    "no_loss_problems",
    "redelivery_note",
    "worker_ack_type",
]

#: How often a paused intake looks whether it may read again (s).
INTAKE_POLL = 0.1


def worker_ack_type(argv: list[str] | None = None) -> str | None:
    """The ``--ack-type`` this ``taskiq worker`` was started with (None: its default)."""
    args = sys.argv if argv is None else argv
    for i, arg in enumerate(args):
        if arg == "--ack-type" and i + 1 < len(args):
            return args[i + 1].lower()
        if arg.startswith("--ack-type="):
            return arg.partition("=")[2].lower()
    return None


def check_app(spec: str) -> Callable[[Config, Any], list[str]]:
    """A ``memwarden check`` extra for ``--taskiq-broker module:broker``."""
    from taskiq.cli.utils import import_object

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as ``taskiq worker`` does
    broker = import_object(spec)

    def taskiq_checks(config: Config, env: Any) -> list[str]:
        out = [f"taskiq: TASKS CAN BE LOST: {p}" for p in no_loss_problems(broker)]
        note = redelivery_note(broker)
        return out + ([f"taskiq: {note}"] if note else [])

    return taskiq_checks


class MemoryWarden(IntakeGuard, TaskiqMiddleware):
    """Taskiq middleware keeping each ``taskiq worker`` process inside its memory quota.

    Options are memwarden's settings (``soft_limit="400MB"``, …; each also a ``MEMWARDEN_*``
    env var), validated here so a bad one fails at import. ``poison_url`` (a Redis URL or
    client) holds the poison-task counts; by default the taskiq-redis broker's own Redis.
    """

    def __init__(self, *, poison_url: Any = None, **options: Unpack[Options]) -> None:
        super().__init__()
        self.config = Config.from_env(**options)
        self.poison_url = poison_url
        self.warden: Warden | None = None
        self.poison: PoisonJobs | None = None
        self.redis: redis.Redis | None = None
        self.kind = "other"
        self.queue = "taskiq"
        self.quarantine_key = "memwarden:taskiq:taskiq:quarantine"
        self.loop: asyncio.AbstractEventLoop | None = None
        self.killing = False
        #: Our RedisStreamBroker consumer's lease, notes and rescues (stream broker only).
        self.consumers: StreamConsumers | None = None
        self.limbo_key = "memwarden:taskiq:taskiq:killed"
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the event loop writes, the watchdog thread reads
        #: Tasks begun and not ended: task id -> record.
        self._running: dict[str, dict[str, Any]] = {}
        #: Messages read and not ended (ListQueueBroker put-back): task id -> raw message.
        self._taken: dict[str, bytes] = {}

    # ----------------------------------------------------------------- process life
    async def startup(self) -> None:
        if not getattr(self.broker, "is_worker_process", False) or self.warden is not None:
            return
        try:
            self._boot()
        except SettingError:
            raise
        except Exception:
            log.exception("memwarden: could not start; this taskiq worker runs unguarded")

    def _boot(self) -> None:
        broker = self.broker
        self.loop = asyncio.get_running_loop()
        self.kind = broker_kind(broker)
        self.queue = str(getattr(broker, "queue_name", "taskiq"))
        self.quarantine_key = f"memwarden:taskiq:{self.queue}:quarantine"
        self.limbo_key = f"memwarden:taskiq:{self.queue}:killed"
        self.redis = self._sync_redis()
        if self.redis is not None and self.config.poison_kills:
            prefix = f"memwarden:taskiq:{self.queue}"
            self.poison = PoisonJobs(self.redis, kills=self.config.poison_kills, prefix=prefix)
        elif self.config.poison_kills:
            log.warning("memwarden: poison-task quarantine is off: pass poison_url='redis://…'")
        broker.listen = self._wrap_listen(broker.listen)  # type: ignore[method-assign]
        self.warden = Warden(self.config, hooks=self.hooks(), framework="taskiq").start()
        self._note_stop_signals()
        if self.redis is not None and self.kind == "list":
            self._push_back_killed()
        if self.redis is not None and self.kind == "stream":
            group = str(getattr(broker, "consumer_group_name", "taskiq"))
            consumer = str(getattr(broker, "consumer_name", ""))
            self.consumers = StreamConsumers(self.redis, self.queue, group, consumer)
            self.consumers.expire_autoclaim_lock()
            self.consumers.renew()
            self.rescue()
            threading.Thread(target=self._lease_loop, name="memwarden-lease", daemon=True).start()
        log.info("memwarden: %r guarding taskiq worker %d", self.warden, os.getpid())
        for note in loss_notes(broker, worker_ack_type()):
            log.info("memwarden: %s", note)

    def _note_stop_signals(self) -> None:
        """Learn when this worker is being stopped (``taskiq worker`` passes SIGINT, a
        platform sends SIGTERM), keeping taskiq's own handler: read no more from then on,
        and want no restart of our own."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)

            def noted(num: int, frame: Any, previous: Any = previous) -> None:
                self.draining = True
                if self.warden is not None:
                    self.warden.being_stopped()
                if callable(previous):
                    previous(num, frame)

            signal.signal(signum, noted)

    async def shutdown(self) -> None:
        if self.warden is None:
            return
        self._stop.set()
        try:
            n = self.give_back()  # read and not begun: taskiq drops them at its stop
            if n:
                log.info("memwarden: %d taskiq messages read and not begun given back", n)
            if self.consumers is not None:
                with self._lock:
                    mine = list(self._running)
                self.consumers.ended(*mine)
                self.consumers.leave()
        except Exception:
            log.exception("memwarden: could not give the unbegun messages back")
        self.warden.stop()

    def _sync_redis(self) -> redis.Redis | None:
        """A plain client for the watchdog thread: ``poison_url``, else the broker's Redis."""
        source = self.poison_url or self.config.redis_url
        if isinstance(source, redis.Redis):
            return source
        if isinstance(source, str):
            return redis.Redis.from_url(source, socket_timeout=5)
        pool = getattr(self.broker, "connection_pool", None)
        kw = dict(getattr(pool, "connection_kwargs", None) or {})
        if not kw:
            return None
        keep = ("host", "port", "db", "username", "password")
        args = {k: kw[k] for k in keep if k in kw}
        if "path" in kw:
            args["unix_socket_path"] = kw["path"]
        return redis.Redis(socket_timeout=5, **args)

    # ----------------------------------------------------------------- intake
    def _wrap_listen(
        self, listen: Callable[[], AsyncGenerator[Any, None]]
    ) -> Callable[[], AsyncGenerator[Any, None]]:
        async def guarded_listen() -> AsyncGenerator[Any, None]:
            messages = listen()
            try:
                while True:
                    await self._intake_open()
                    message = await anext(messages)
                    task = self._note(message)
                    # Read as intake closed (a read was under way): held, unbegun; at a
                    # stop or a kill it goes back with the rest.
                    await self._intake_open()
                    if task is None or not await self._quarantined(message, task):
                        yield message
            finally:
                await messages.aclose()

        return guarded_listen

    async def _intake_open(self) -> None:
        while self.paused or self.draining or self.killing:
            await asyncio.sleep(INTAKE_POLL)

    def _note(self, message: bytes | AckableMessage) -> TaskiqMessage | None:
        """The task of a message read (None: unreadable, taskiq itself skips it); on
        ListQueueBroker, the message is kept until its task ends, to put it back."""
        data = message.data if isinstance(message, AckableMessage) else message
        try:
            task = self.broker.formatter.loads(message=data)
        except Exception:
            return None
        if self.kind == "list":
            with self._lock:
                self._taken[task.task_id] = data
        return task

    async def _quarantined(self, message: bytes | AckableMessage, task: TaskiqMessage) -> bool:
        """True (and quarantined) when the task was running at ``poison_kills`` kills."""
        kills = self._poison_kills(task.task_id)
        if not kills:
            return False
        data = message.data if isinstance(message, AckableMessage) else message
        await self._quarantine(message, data, task, kills)
        return True

    @_hook_guard
    def _poison_kills(self, task_id: str) -> int:
        if self.poison is None:
            return 0
        kills = self.poison.count(task_id)
        return kills if kills >= self.poison.kills else 0

    async def _quarantine(
        self, message: bytes | AckableMessage, data: bytes, task: TaskiqMessage, kills: int
    ) -> None:
        """Off the queue for good: the raw message to the quarantine list, a failed result."""
        reason = f"running at {kills} hard kills: quarantined by memwarden, not retried"
        assert self.redis is not None
        self.redis.rpush(self.quarantine_key, data)
        with self._lock:
            self._taken.pop(task.task_id, None)
        if isinstance(message, AckableMessage):
            await cast("Any", message.ack())
        with contextlib.suppress(Exception):
            error = RuntimeError(f"taskiq task {task.task_name}[{task.task_id}] {reason}")
            result: TaskiqResult[Any] = TaskiqResult(
                is_err=True, return_value=None, execution_time=0.0, error=error
            )
            await self.broker.result_backend.set_result(task.task_id, result)
        if self.warden is not None:
            self.warden.quarantined(
                task.task_name, task.task_id, kills, where=self.quarantine_key, reason=reason
            )

    # ----------------------------------------------------------------- records
    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        self._started(message)
        return message

    @_hook_guard
    def _started(self, message: TaskiqMessage) -> None:
        if self.warden is None:
            return
        with self._lock:
            self._running[message.task_id] = {"job": message.task_name, "job_id": message.task_id}
        if self.consumers is not None:
            self.consumers.started(message.task_id, message.task_name)
        self.warden.job_started(message.task_name, message.task_id, queue=self.queue)

    @_hook_guard
    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        if self.warden is None:
            return
        with self._lock:
            self._running.pop(message.task_id, None)
            self._taken.pop(message.task_id, None)
        if self.consumers is not None:
            self.consumers.ended(message.task_id)
        self.warden.job_finished(message.task_id)

    # ----------------------------------------------------------------- the warden's hooks
    def drain(self) -> None:
        self.draining = True
        log.warning("memwarden: taskiq worker %d draining: no new tasks", os.getpid())

    def in_flight(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._running.values()]

    def before_kill(self, in_flight: list[dict[str, Any]]) -> dict[str, Any]:
        """Just before the hard kill: read nothing more, count one kill against every task
        running now, give every message this worker holds back to its queue."""
        self.killing = True
        hand = self.in_flight()
        if self.poison is not None:
            for job in hand:
                self.poison.record_kill(job["job_id"])
        fields: dict[str, Any] = {"in_flight": hand}
        try:
            if self.consumers is not None:
                self._stop.set()
                self.consumers.ended(*[j["job_id"] for j in hand])  # counted just now
                self.consumers.let_go()
            fields["given_back"] = self.give_back(dying=True)
            if self.consumers is not None:
                self.consumers.expire_autoclaim_lock()
        except Exception:
            log.exception("memwarden: could not give the messages back")
        return fields

    def give_back(self, dying: bool = False) -> int:
        """Every message this worker holds, back to its queue; returns how many.
        ``dying`` (a kill is next): a list's messages are put aside, for the next worker
        to start to push back (a read under way here would take them)."""
        if self.consumers is not None:
            return self.consumers.give_back()
        if self.redis is not None and self.kind == "list":
            with self._lock:
                taken = list(self._taken.values())
                self._taken.clear()
            if taken:
                where = self.limbo_key if dying else self.queue
                self.redis.rpush(where, *reversed(taken))  # BRPOP takes the tail
            return len(taken)
        return 0

    @_hook_guard
    def _push_back_killed(self) -> None:
        """The messages a killed worker held (ListQueueBroker), back on the queue's tail."""
        assert self.redis is not None
        n = 0
        while self.redis.lmove(self.limbo_key, self.queue, "LEFT", "RIGHT") is not None:
            n += 1
        if n:
            log.warning(
                "memwarden: %d taskiq messages of a killed worker back on %s", n, self.queue
            )

    # ----------------------------------------------------------------- dead consumers
    def _lease_loop(self) -> None:
        assert self.consumers is not None
        renew = self.consumers.renew
        lease_loop(
            self._stop, renew, self.rescue, lease=LEASE, rescue_every=RESCUE_EVERY, what="taskiq"
        )

    @_hook_guard
    def rescue(self) -> None:
        """The stream consumers of dead workers: one kill counted against each task they
        ran, every message they held back on the stream at once (not after
        ``idle_timeout``)."""
        if self.consumers is not None:
            self.consumers.rescue(self._count_rescued)

    def _count_rescued(self, task_id: str, task_name: str) -> None:
        kills = self.poison.record_kill(task_id) if self.poison is not None else 0
        if self.warden is not None:
            self.warden.journal.write(
                "requeue",
                by="rescue",
                job=task_name,
                job_id=task_id,
                kills=kills,
                framework="taskiq",
                queue=self.queue,
            )
