"""Ways back: how a drained worker comes back fresh.

Each is one small module with ``make(config) -> Restarter``; ``restart(reason)`` runs after
the drain (nothing in flight, or the drain time spent) and may end the process. If the
process is still alive ``shutdown_timeout`` later, the warden kills it.

- ``signal``: send ourselves the stop signal (SIGTERM): the framework's own graceful shutdown;
  the supervisor (dyno manager, kubelet, systemd, ``memwarden run``) starts it again.
- ``exit``: leave with ``exit_code`` (default 75, EX_TEMPFAIL: "try again").
- ``none``: do nothing but record (the supervisor watches from outside).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from memwarden.config import Config


class Restarter(Protocol):
    name: str

    def restart(self, reason: str) -> None: ...


class NoRestart:
    name = "none"

    def restart(self, reason: str) -> None:
        return None


def make_restarter(config: Config) -> Restarter:
    """The restarter named by ``config.restart``."""
    if config.restart == "none":
        return NoRestart()
    module = importlib.import_module(f"memwarden.restart.{config.restart}")
    restarter: Restarter = module.make(config)
    return restarter
