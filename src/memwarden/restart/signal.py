"""Restart by our own graceful stop signal: the framework shuts down, the supervisor restarts."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memwarden.config import Config


class SignalRestarter:
    name = "signal"

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def restart(self, reason: str) -> None:
        os.kill(os.getpid(), self.signum)


def make(config: Config) -> SignalRestarter:
    return SignalRestarter(config.signal_number)
