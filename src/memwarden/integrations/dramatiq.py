"""Dramatiq: ``broker.add_middleware(memwarden.dramatiq.MemoryWarden(**options))``.

One :class:`~memwarden.warden.Warden` per worker process, built when the process boots.

- Records: ``before_process_message`` / ``after_process_message`` (and ``after_skip_message``)
  give one ``job`` record per message: actor name, message id, queue, per worker thread.
- Drain: this process's worker threads pause after their current message (prefetched
  messages stay unacked and go back to the queue when the worker stops).
- Restart: Dramatiq's main process treats any worker process that exits as fatal and shuts
  the whole tree down, so one process cannot be restarted alone. Under the ``dramatiq`` CLI
  the default ``restart=signal`` therefore sends **SIGHUP to the main process**: Dramatiq's
  own reload — every worker process stops gracefully (finishes its messages, requeues
  prefetched ones), then the main process re-executes itself in place. The whole tree comes
  back fresh with no supervisor involved. Other ``restart`` values (exit, heroku, …) act
  as in the core.
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


class DramatiqReload:
    """Restart the whole worker tree: SIGHUP to the main process (once)."""

    name = "reload"

    def __init__(self, main_pid: int, stopping: threading.Event) -> None:
        self.main_pid = main_pid
        self.stopping = stopping

    def restart(self, reason: str) -> None:
        # A second stop signal makes Dramatiq kill every worker process at once: send none
        # when this process is already being stopped (a reload is under way).
        if not self.stopping.is_set():
            os.kill(self.main_pid, signal.SIGHUP)


class MemoryWarden(dramatiq.Middleware):
    """Dramatiq middleware keeping each worker process inside its memory quota.

    Options are memwarden's settings (``soft_limit="400MB"``, ``restart``, …; each also a
    ``MEMWARDEN_*`` env var), validated here so a bad one fails at import. ``poison_redis``
    (a URL or a redis client) holds the poison-job counts; by default the Redis broker's own
    client, and none (quarantine off) for other brokers.
    """

    def __init__(self, *, poison_redis: Any = None, **options: Any) -> None:
        self.config = Config.from_env(**options)
        self.poison_redis = poison_redis
        self.warden: Warden | None = None
        self.poison: PoisonJobs | None = None
        self.worker: dramatiq.Worker | None = None
        self.stopping = threading.Event()
        self.main_pid: int | None = None  # the dramatiq CLI's main process, when under it

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
            restarter = DramatiqReload(main_pid, self.stopping)
            hooks.kill = lambda: self.reload_then_die(main_pid)
        self.warden = Warden(self.config, hooks=hooks, restarter=restarter, framework="dramatiq")
        self.poison = self._poison_counter(broker)
        log.info("memwarden: %r guarding dramatiq worker %d", self.warden, os.getpid())

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

    def reload_then_die(self, main_pid: int) -> None:
        """Hard kill under the CLI: ask the main process to reload (so it restarts the tree
        rather than shutting down on our death), wait until it has passed the reload on to
        us, then SIGKILL ourselves and our children."""
        if not self.stopping.is_set():
            with contextlib.suppress(OSError):
                os.kill(main_pid, signal.SIGHUP)
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
        source = self.poison_redis
        if kills == 0:
            return None
        if isinstance(source, str):
            return PoisonJobs.from_url(source, kills=kills)
        if source is None:
            source = getattr(broker, "client", None)  # the Redis broker's client
        if source is None:
            log.warning(
                "memwarden: poison-message quarantine is off: pass "
                "MemoryWarden(poison_redis='redis://…') with a non-Redis broker"
            )
            return None
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
