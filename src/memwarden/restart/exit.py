"""Restart by exiting with a status the supervisor restarts on (default 75, EX_TEMPFAIL)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memwarden.config import Config


class ExitRestarter:
    name = "exit"

    def __init__(self, code: int) -> None:
        self.code = code

    def restart(self, reason: str) -> None:
        for handler in logging.getLogger().handlers + logging.getLogger("memwarden").handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(self.code)


def make(config: Config) -> ExitRestarter:
    return ExitRestarter(config.exit_code)
