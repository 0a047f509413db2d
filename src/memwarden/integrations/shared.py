"""What several integrations do alike: the intake flags and hooks of a job-framework guard,
and the lease loop of the Redis-backed ones (arq, Huey, Taskiq's stream broker)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from memwarden.hooks import Hooks

log = logging.getLogger("memwarden")


class IntakeGuard:
    """A guard whose framework looks at two flags before it starts a job: ``paused`` (over
    the soft limit: no new job for now) and ``draining`` (a restart under way: none again).
    The warden's pause, resume and drain hooks set them; a guard adds its own to them."""

    paused = False
    draining = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def drain(self) -> None:
        self.draining = True

    def in_flight(self) -> list[dict[str, Any]]:
        """The jobs in hand now (each guard says)."""
        raise NotImplementedError

    def before_kill(self, in_flight: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Just before the hard kill: the jobs in hand dealt with (each guard says)."""
        raise NotImplementedError

    def hooks(self, **more: Any) -> Hooks:
        """This guard's hooks for its warden, with ``more`` (``recycle=…``)."""
        return Hooks(
            drain=self.drain,
            pause=self.pause,
            resume=self.resume,
            in_flight=self.in_flight,
            before_kill=self.before_kill,
            **more,
        )


def lease_loop(
    stop: threading.Event,
    renew: Callable[[], object],
    rescue: Callable[[], object],
    *,
    lease: float,
    rescue_every: float,
    what: str,
) -> None:
    """Until ``stop`` is set: ``renew`` the worker's lease every third of ``lease`` seconds,
    and ``rescue`` (the jobs of workers whose lease is gone) every ``rescue_every`` seconds
    after that. An error is logged (``memwarden: {what} lease or rescue failed (retried)``)
    and the loop goes on. Run in a daemon thread."""
    last = time.monotonic()
    while not stop.wait(lease / 3):
        try:
            renew()
            if time.monotonic() - last >= rescue_every:
                last = time.monotonic()
                rescue()
        except Exception:
            log.exception("memwarden: %s lease or rescue failed (retried)", what)
