"""Restart by our own graceful stop signal: the framework shuts down, the supervisor restarts."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from memwarden.restart.exit import ExitRestarter

if TYPE_CHECKING:
    from memwarden.config import Config

log = logging.getLogger("memwarden")


class SignalRestarter:
    """Send ourselves ``signum``; if that cannot be done, exit with ``exit_code`` instead."""

    name = "signal"

    def __init__(self, signum: int, exit_code: int = 75) -> None:
        self.signum = signum
        self.exit_code = exit_code

    def restart(self, reason: str) -> None:
        try:
            os.kill(os.getpid(), self.signum)
        except Exception as exc:  # a bad signal number: never left drained and alive
            log.error(
                "memwarden: cannot send ourselves signal %s (%s): exiting with status %d instead",
                self.signum,
                exc,
                self.exit_code,
            )
            ExitRestarter(self.exit_code).restart(reason)


def make(config: Config) -> SignalRestarter:
    return SignalRestarter(config.signal_number, config.exit_code)
