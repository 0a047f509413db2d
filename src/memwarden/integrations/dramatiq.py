"""Dramatiq: ``broker.add_middleware(memwarden.dramatiq.MemoryWarden(**options))``.

One :class:`~memwarden.warden.Warden` per worker process, built when the process boots.

- Records: ``before_process_message`` / ``after_process_message`` (and ``after_skip_message``)
  give one ``job`` record per message: actor name, message id, queue, per worker thread.
  The middleware's own record of the message each worker thread has in hand is the
  warden's in-flight list.
- Pause / resume (over the soft limit): the worker threads pause after their current
  message and take the next one again when memory is back under it; the consumers keep
  their prefetched messages (and their heartbeats), nothing goes back to the broker.
- Drain: this process's worker threads pause after their current message (prefetched
  messages stay unacked and go back to the queue when the worker stops).
- Restart: Dramatiq's main process treats any worker process that exits as fatal and shuts
  the whole tree down, so one process cannot be restarted alone. Under the ``dramatiq`` CLI
  the default ``restart=signal`` therefore sends **SIGHUP to the main process**, at drain
  time: Dramatiq's own reload — every worker process stops taking messages at once, finishes
  the ones it runs, requeues prefetched ones; then the main process re-executes itself in
  place. The whole tree comes back fresh with no supervisor involved. Other ``restart``
  values (exit, heroku, …) act as in the core after this process's own drain.
- Hard kill: intake stops (a message a thread takes now waits for the kill, unacked), the
  messages in hand at that instant are counted against their ids (:class:`PoisonJobs`,
  Redis), and on the Redis broker every message the worker holds goes back to its queue
  before the SIGKILL (:mod:`memwarden.integrations.dramatiq_redis`; RabbitMQ redelivers
  on the dropped connection). One running at ``poison_kills`` kills is failed
  (dead-lettered) when it comes back.
- Redis broker: a sweep thread refreshes this worker's heartbeat and gives back what dead
  workers held, at boot and every few seconds, whatever ``maintenance_chance``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any, Unpack

import dramatiq
from dramatiq.middleware import SkipMessage

from memwarden.config import Config, Options
from memwarden.hooks import Hooks
from memwarden.integrations.dramatiq_redis import (
    KILL_SETTLE,
    Redelivery,
    Sweeper,
    is_redis_broker,
    sweep_period,
)
from memwarden.poison import PoisonJobs
from memwarden.restart import Restarter
from memwarden.units import SettingError
from memwarden.warden import Warden, kill_tree_and_self, swallow_but

#: Dramatiq's control flow from its signal handlers (``Interrupt``, ``Shutdown``) derives
#: from BaseException: no hook boundary catches it. Declared for the integration contract.
HOST_CONTROL_FLOW: tuple[type[BaseException], ...] = ()
_hook_guard = swallow_but(*HOST_CONTROL_FLOW)

log = logging.getLogger("memwarden")

__all__ = ["DramatiqReload", "MemoryWarden", "dramatiq_main_pid"]

#: How long a hard kill waits for the main process to pass our reload on to us.
RELOAD_ACK_TIMEOUT = 2.0
#: How long a thread that takes a message once the kill is decided waits for it (s): the
#: message stays unacked and goes back to the broker; should the kill not come, it runs.
KILL_WAIT = 60.0


def dramatiq_main_pid() -> int | None:
    """The pid of the ``dramatiq`` CLI main process when we are one of its workers."""
    if "dramatiq.cli" not in sys.modules:
        return None
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return None
    try:
        with open(f"/proc/{parent.pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    return parent.pid if b"dramatiq" in cmdline else None


def redis_redelivery_note(broker: dramatiq.Broker) -> str | None:
    """When the messages of a dead worker come back with the Redis broker."""
    if not is_redis_broker(broker):
        return None
    timeout = float(getattr(broker, "heartbeat_timeout", 0)) / 1000
    period = sweep_period(timeout * 1000)
    return (
        f"Redis broker: messages held by a worker memwarden kills go back at once; by one "
        f"that dies otherwise, within heartbeat_timeout + {period:g} s "
        f"({timeout + period:g} s) while a guarded worker runs"
    )


class DramatiqReload:
    """Reload the whole worker tree: SIGHUP to the ``dramatiq`` main process, at most once.

    The main process passes it to every worker process: each stops taking messages, finishes
    the ones it runs, requeues its prefetched ones and exits; then the main process
    re-executes itself. A second stop signal would make Dramatiq kill every worker process
    at once, so none is sent when this process is already being stopped.
    """

    name = "reload"

    def __init__(self, main_pid: int, stopping: threading.Event) -> None:
        self.main_pid = main_pid
        self.stopping = stopping
        self.sent = False

    def request(self) -> bool:
        """Ask for the reload; True if this call sent the signal."""
        if self.sent or self.stopping.is_set():
            return False
        self.sent = True
        os.kill(self.main_pid, signal.SIGHUP)
        return True

    def restart(self, reason: str) -> None:
        self.request()


class MemoryWarden(dramatiq.Middleware):
    """Dramatiq middleware keeping each worker process inside its memory quota.

    Options are memwarden's settings (``soft_limit="400MB"``, ``restart``, …; each also a
    ``MEMWARDEN_*`` env var), validated here so a bad one fails at import. ``poison_url``
    (a Redis URL or client) holds the poison-message counts; by default the Redis broker's
    own client, else ``MEMWARDEN_REDIS_URL``; with neither, quarantine is off (said once).
    """

    def __init__(self, *, poison_url: Any = None, **options: Unpack[Options]) -> None:
        self.config = Config.from_env(**options)
        self.poison_url = poison_url
        self.warden: Warden | None = None
        self.poison: PoisonJobs | None = None
        self.worker: dramatiq.Worker | None = None
        self.stopping = threading.Event()
        #: Set once a hard kill is decided: intake is over for good.
        self.killing = threading.Event()
        self.main_pid: int | None = None  # the dramatiq CLI's main process, when under it
        self.reload: DramatiqReload | None = None
        self.redelivery: Redelivery | None = None
        self.sweeper: Sweeper | None = None
        #: Clear while intake is paused (or drained): a message a worker thread takes then
        #: waits, unbegun, for the resume (or the stop, or the kill).
        self.intake = threading.Event()
        self.intake.set()
        #: How many messages worker threads hold unbegun, waiting for intake.
        self.holding = 0
        #: The message each worker thread has in hand (thread ident -> record).
        self._in_hand: dict[int, dict[str, Any]] = {}
        self._hand_lock = threading.Lock()

    # ----------------------------------------------------------------- process life
    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        try:
            self._boot(broker, worker)
        except SettingError:
            raise  # a bad setting stops the worker loudly, naming the env var
        except Exception:
            log.exception("memwarden: could not start; this worker runs unguarded")

    def _boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.worker = worker
        self.main_pid = main_pid = dramatiq_main_pid()
        restarter: Restarter | None = None
        hooks = Hooks(
            drain=self.drain,
            pause=self.pause,
            resume=self.resume,
            in_flight=self.in_hand,
            before_kill=self.before_kill,
        )
        if main_pid is not None and self.config.restart == "signal":
            # The restart is the whole tree's, and so is the drain: every worker process
            # stops taking messages at once, not only the one that decided.
            self.reload = restarter = DramatiqReload(main_pid, self.stopping)
            hooks.drain = self.drain_tree
            hooks.kill = self.reload_then_die
        self.warden = Warden(self.config, hooks=hooks, restarter=restarter, framework="dramatiq")
        self.poison = self._poison_counter(broker)
        if is_redis_broker(broker):
            self.redelivery = Redelivery(broker)
        log.info("memwarden: %r guarding dramatiq worker %d", self.warden, os.getpid())
        note = redis_redelivery_note(broker)
        if note:
            log.info("memwarden: %s", note)

    @_hook_guard
    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.main_pid is not None:
            self._note_stop_signals()
        if self.warden is not None:
            self.warden.start()
        if self.redelivery is not None:
            period = sweep_period(float(getattr(broker, "heartbeat_timeout", 0)))
            self.sweeper = Sweeper(self.redelivery, period).start()

    @_hook_guard
    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.stopping.set()  # a message waiting for the resume runs: the worker joins it

    @_hook_guard
    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # Not before: the watchdog (and the restart's hard-kill deadline) keeps guarding
        # the messages that are finishing during the shutdown.
        if self.warden is not None:
            self.warden.stop()
        if self.sweeper is not None:
            self.sweeper.stop()

    # ----------------------------------------------------------------- messages
    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if not self.intake.is_set():
            self._wait_for_intake(message)
        kills = self._poison_kills(message)
        if kills:
            message.fail()
            raise SkipMessage(
                f"memwarden: message {message.message_id} ({message.actor_name}) was running "
                f"at {kills} hard kills of its worker: quarantined as a poison message"
            )
        self._took(message)
        if self.warden is not None:
            self.warden.job_started(
                message.actor_name, message.message_id, queue=message.queue_name
            )

    @_hook_guard
    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        self._done()
        if self.warden is not None:
            self.warden.job_finished(message.message_id)

    @_hook_guard
    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self._done()
        if self.warden is not None:
            self.warden.job_finished(message.message_id)

    @_hook_guard
    def _took(self, message: Any) -> None:
        thread = threading.current_thread()
        record = {
            "job": message.actor_name,
            "job_id": message.message_id,
            "queue": message.queue_name,
            "thread": thread.name,
        }
        with self._hand_lock:
            self._in_hand[thread.ident or 0] = record

    def _done(self) -> None:
        with self._hand_lock:
            self._in_hand.pop(threading.get_ident(), None)

    def in_hand(self) -> list[dict[str, Any]]:
        """The messages the worker threads have in hand now (begun, not ended)."""
        with self._hand_lock:
            return [dict(r) for r in self._in_hand.values()]

    def _wait_for_intake(self, message: Any) -> None:
        """A message taken while intake is paused (a worker thread already waiting on the
        work queue takes one) is not begun until the resume. Once the kill is decided it
        never is: it stays unacked, is given back, and this thread waits to die with the
        process. When the worker stops meanwhile, it runs (Dramatiq joins its threads)."""
        log.info("memwarden: message %s waits, unbegun, for intake", message.message_id)
        with self._hand_lock:
            self.holding += 1
        try:
            while not (self.intake.wait(0.1) or self.stopping.is_set() or self.killing.is_set()):
                pass
        finally:
            with self._hand_lock:
                self.holding -= 1
        if self.killing.is_set():
            threading.Event().wait(KILL_WAIT)

    # ----------------------------------------------------------------- warden hooks
    def drain(self) -> None:
        """Stop taking messages: each worker thread pauses after its current one."""
        self.pause()

    def pause(self) -> None:
        """Stop taking messages for now: each worker thread pauses after its current one
        (one already waiting on the work queue holds what it takes, unbegun); the consumers
        keep their prefetched messages for the resume. Not ``Worker.pause``, which blocks
        until every thread is idle."""
        self.intake.clear()
        if self.worker is not None:
            for thread in self.worker.workers:
                thread.pause()

    def resume(self) -> None:
        """Take messages again after :meth:`pause`, unless the worker is being stopped."""
        if self.stopping.is_set() or self.killing.is_set():
            return
        if self.worker is not None:
            for thread in self.worker.workers:
                thread.resume()
        self.intake.set()

    def before_kill(self, in_flight: list[dict[str, Any]]) -> dict[str, Any]:
        """Just before the hard kill: stop intake for good, give back to the broker every
        message this worker holds (Redis), and count one kill against each message in hand
        at this instant. Returns the kill record's exact ``in_flight`` (and ``given_back``)."""
        self.killing.set()
        self.intake.clear()
        fields: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            self._stop_intake()
        if self.redelivery is not None:
            try:
                fields["given_back"] = self.redelivery.give_back()
            except Exception:
                log.exception(
                    "memwarden: could not give the messages back; they come back in %g s",
                    KILL_SETTLE / 1000,
                )
        hand = self.in_hand()
        fields["in_flight"] = hand
        self.count_kills(hand)
        return fields

    def _stop_intake(self) -> None:
        """No consumer fetches again, no worker thread takes another message."""
        if self.worker is None:
            return
        for consumer in self.worker.consumers.values():
            consumer.stop()
        self.pause()

    @_hook_guard
    def count_kills(self, in_flight: list[dict[str, Any]]) -> None:
        """One kill against every message in ``in_flight``."""
        if self.poison is None:
            return
        for job in in_flight:
            if job.get("job_id") is not None:
                self.poison.record_kill(job["job_id"])

    def drain_tree(self) -> None:
        """Drain under the CLI: ours now, every worker process's through the reload."""
        self.drain()
        if self.reload is not None:
            self.reload.request()

    def reload_then_die(self) -> None:
        """Hard kill under the CLI: ask the main process to reload (so it restarts the tree
        rather than shutting down on our death), wait until it has passed the reload on to
        us, then SIGKILL ourselves and our children."""
        if self.reload is not None:
            with contextlib.suppress(OSError):
                self.reload.request()
            self.stopping.wait(RELOAD_ACK_TIMEOUT)
        kill_tree_and_self()

    # ----------------------------------------------------------------- helpers
    @_hook_guard
    def _poison_kills(self, message: Any) -> int:
        """The message's kill count when it is poison, else 0 (or None on error)."""
        if self.poison is None:
            return 0
        kills = self.poison.count(message.message_id)
        if kills < self.poison.kills:
            return 0
        if self.warden is not None:
            where = f"{message.queue_name}.XQ"  # dead-lettered
            self.warden.quarantined(
                message.actor_name, message.message_id, kills, where=where, queue=message.queue_name
            )
        return kills

    def _poison_counter(self, broker: dramatiq.Broker) -> PoisonJobs | None:
        kills = self.config.poison_kills
        if kills == 0:
            return None
        source = self.poison_url
        if source is None:
            source = getattr(broker, "client", None)  # the Redis broker's own client
        if source is None:
            source = getattr(self.config, "redis_url", None)
        if source is None:
            log.warning(
                "memwarden: poison-message quarantine is off: set MEMWARDEN_REDIS_URL or "
                "pass MemoryWarden(poison_url='redis://…') with a non-Redis broker"
            )
            return None
        if isinstance(source, str):
            return PoisonJobs.from_url(source, kills=kills)
        return PoisonJobs(source, kills=kills)

    def _note_stop_signals(self) -> None:
        """Learn when the main process stops us (SIGTERM, or SIGHUP for a reload), keeping
        Dramatiq's own handler (the CLI's worker processes boot in their main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous = signal.getsignal(signum)

            def noted(num: int, frame: Any, previous: Any = previous) -> None:
                # Being stopped (Dramatiq acts on it within a second): take no more
                # messages from now on, and want no soft restart of our own.
                self.stopping.set()
                with contextlib.suppress(Exception):
                    self.drain()
                if self.warden is not None:
                    self.warden.being_stopped()
                if callable(previous):
                    previous(num, frame)

            signal.signal(signum, noted)
