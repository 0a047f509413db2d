"""Dramatiq: ``broker.add_middleware(memwarden.dramatiq.MemoryWarden(**options))``.

One :class:`~memwarden.warden.Warden` per worker process, built when the process boots.

- Records: ``before_process_message`` / ``after_process_message`` (and ``after_skip_message``)
  give one ``job`` record per message: actor name, message id, queue, per worker thread.
- Drain: this process's worker threads pause after their current message (prefetched
  messages stay unacked and go back to the queue when the worker stops).
- Restart: Dramatiq's main process treats any worker process that exits as fatal and shuts
  the whole tree down, so one process cannot be restarted alone. Under the ``dramatiq`` CLI
  the default ``restart=signal`` therefore sends **SIGHUP to the main process**, at drain
  time: Dramatiq's own reload — every worker process stops taking messages at once, finishes
  the ones it runs, requeues prefetched ones; then the main process re-executes itself in
  place. The whole tree comes back fresh with no supervisor involved. Other ``restart``
  values (exit, heroku, …) act as in the core after this process's own drain.
- Hard kill: messages are acked late, so an interrupted message comes back through the
  broker. Every message in flight is counted against its id (:class:`PoisonJobs`, Redis);
  one running at ``poison_kills`` kills is failed (dead-lettered) when it comes back.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any

import dramatiq
from dramatiq.middleware import SkipMessage

from memwarden.config import Config
from memwarden.poison import PoisonJobs
from memwarden.restart import Restarter
from memwarden.units import SettingError
from memwarden.warden import Hooks, Warden, kill_tree_and_self, swallow

log = logging.getLogger("memwarden")

__all__ = ["DramatiqReload", "MemoryWarden", "dramatiq_main_pid"]

#: How long a hard kill waits for the main process to pass our reload on to us.
RELOAD_ACK_TIMEOUT = 2.0


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
    """With the Redis broker a killed worker's messages come back only after its heartbeat
    times out, at the next queue maintenance (a random share of broker commands)."""
    timeout = getattr(broker, "heartbeat_timeout", None)
    chance = getattr(broker, "maintenance_chance", None)
    if timeout is None or chance is None:
        return None
    return (
        f"Redis broker: messages of a killed worker come back after heartbeat_timeout "
        f"({timeout / 1000:g} s), at the next maintenance ({chance / 10000:g}% of commands)"
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

    def __init__(self, *, poison_url: Any = None, **options: Any) -> None:
        self.config = Config.from_env(**options)
        self.poison_url = poison_url
        self.warden: Warden | None = None
        self.poison: PoisonJobs | None = None
        self.worker: dramatiq.Worker | None = None
        self.stopping = threading.Event()
        self.main_pid: int | None = None  # the dramatiq CLI's main process, when under it
        self.reload: DramatiqReload | None = None

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
        hooks = Hooks(drain=self.drain, before_kill=self.count_kills)
        if main_pid is not None and self.config.restart == "signal":
            # The restart is the whole tree's, and so is the drain: every worker process
            # stops taking messages at once, not only the one that decided.
            self.reload = restarter = DramatiqReload(main_pid, self.stopping)
            hooks.drain = self.drain_tree
            hooks.kill = self.reload_then_die
        self.warden = Warden(self.config, hooks=hooks, restarter=restarter, framework="dramatiq")
        self.poison = self._poison_counter(broker)
        log.info("memwarden: %r guarding dramatiq worker %d", self.warden, os.getpid())
        note = redis_redelivery_note(broker)
        if note:
            log.info("memwarden: %s", note)

    @swallow
    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        if self.main_pid is not None:
            self._note_stop_signals()
        if self.warden is not None:
            self.warden.start()

    @swallow
    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # Not before: the watchdog (and the restart's hard-kill deadline) keeps guarding
        # the messages that are finishing during the shutdown.
        if self.warden is not None:
            self.warden.stop()

    # ----------------------------------------------------------------- messages
    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        kills = self._poison_kills(message)
        if kills:
            message.fail()
            raise SkipMessage(
                f"memwarden: message {message.message_id} ({message.actor_name}) was running "
                f"at {kills} hard kills of its worker: quarantined as a poison message"
            )
        if self.warden is not None:
            self.warden.job_started(
                message.actor_name, message.message_id, queue=message.queue_name
            )

    @swallow
    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if self.warden is not None:
            self.warden.job_finished(message.message_id)

    @swallow
    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if self.warden is not None:
            self.warden.job_finished(message.message_id)

    # ----------------------------------------------------------------- warden hooks
    def drain(self) -> None:
        """Stop taking messages: each worker thread pauses after its current one."""
        if self.worker is not None:
            for thread in self.worker.workers:
                thread.pause()

    def count_kills(self, in_flight: list[dict[str, Any]]) -> None:
        """Before a hard kill: one kill against every message in flight."""
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
    @swallow
    def _poison_kills(self, message: Any) -> int:
        """The message's kill count when it is poison, else 0 (or None on error)."""
        if self.poison is None:
            return 0
        kills = self.poison.count(message.message_id)
        if kills < self.poison.kills:
            return 0
        log.error(
            "memwarden: message %s (%s) was running at %d hard kills: dead-lettered",
            message.message_id,
            message.actor_name,
            kills,
        )
        if self.warden is not None:
            self.warden.journal.write(
                "poison",
                job=message.actor_name,
                job_id=message.message_id,
                queue=message.queue_name,
                kills=kills,
                action="dead-lettered",
                framework="dramatiq",
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
                    self.warden.policy.restarting = True
                if callable(previous):
                    previous(num, frame)

            signal.signal(signum, noted)
