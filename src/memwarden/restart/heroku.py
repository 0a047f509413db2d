"""Restart this dyno through the Heroku Platform API: ``DELETE /apps/{app}/dynos/{dyno}``.

Called after the drain. Heroku then stops the dyno (SIGTERM, SIGKILL 30 s later) and starts
a fresh one; unlike a process that exits, this is not a crash, so no crash cool-off delays
the next start. Needs ``HEROKU_APP_NAME`` (``heroku labs:enable runtime-dyno-metadata``),
``DYNO`` (set by Heroku) and ``HEROKU_API_TOKEN``. When the API cannot be used — a missing
or refused setting, or no answer after the retries — the error says what to fix and the
worker restarts the local way (exit) instead: never silently not at all.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING

from memwarden import redact
from memwarden.restart import Restarter
from memwarden.restart.api import ApiError, Secret, call
from memwarden.restart.exit import ExitRestarter

if TYPE_CHECKING:
    from memwarden.config import Config

log = logging.getLogger("memwarden")

ACCEPT = "application/vnd.heroku+json; version=3"
ENABLE_METADATA = "heroku labs:enable runtime-dyno-metadata -a <app> (then redeploy)"


class HerokuRestarter:
    """``restart`` asks Heroku to restart this dyno, or falls back to ``fallback``."""

    name = "heroku"

    def __init__(
        self,
        *,
        app: str | None,
        dyno: str | None,
        token: Secret,
        api_url: str = "https://api.heroku.com",
        timeout: float = 5.0,
        retries: int = 3,
        deadline: float | None = None,
        fallback: Restarter,
    ) -> None:
        self.app = app
        self.dyno = dyno
        self._token = token
        self.api_url = api_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        #: The whole call, retries included, ends this long after it starts (None: as
        #: the tries and back-offs add up).
        self.deadline = deadline
        self.fallback = fallback
        self._fell_back = False

    @classmethod
    def from_env(
        cls, config: Config, env: Mapping[str, str], fallback: Restarter
    ) -> HerokuRestarter:
        return cls(
            app=env.get("HEROKU_APP_NAME") or None,
            dyno=env.get("DYNO") or None,
            token=Secret(env.get("HEROKU_API_TOKEN", "").strip()),
            api_url=config.heroku_api_url,
            timeout=config.api_timeout,
            retries=config.api_retries,
            deadline=config.shutdown_timeout,
            fallback=fallback,
        )

    def __repr__(self) -> str:
        return (
            f"HerokuRestarter(app={self.app!r}, dyno={self.dyno!r}, api={self.api_url!r}, "
            f"token={self._token!r})"
        )

    def problems(self) -> list[str]:
        """What is missing before the API can be called, each naming what to set."""
        found = []
        if not self.app:
            found.append(f"HEROKU_APP_NAME is not set: enable it with `{ENABLE_METADATA}`")
        if not self.dyno:
            found.append("DYNO is not set: Heroku sets it on every dyno; not on Heroku?")
        if not self._token:
            found.append(
                "HEROKU_API_TOKEN is not set: `heroku authorizations:create --scope write "
                "--description memwarden`, then `heroku config:set HEROKU_API_TOKEN=…`"
            )
        elif not self._token.reveal().isascii() or not self._token.reveal().isprintable():
            found.append(
                "HEROKU_API_TOKEN holds characters no HTTP header can carry (a stray "
                "quote, space or non-ASCII letter?): set it again from `heroku authorizations`"
            )
        return found

    @property
    def url(self) -> str:
        app = urllib.parse.quote(self.app or "", safe="")
        dyno = urllib.parse.quote(self.dyno or "", safe="")
        return f"{self.api_url}/apps/{app}/dynos/{dyno}"

    def restart(self, reason: str) -> None:
        """Ask Heroku; on any failure at all, the local way instead (once, said loudly)."""
        try:
            self._restart(reason)
        except Exception as exc:
            shown = redact.text(str(exc), known=[self._token.reveal()])
            log.error("memwarden: Heroku restart failed (%s: %s)", type(exc).__name__, shown)
            self._fall_back()

    def _restart(self, reason: str) -> None:
        problems = self.problems()
        if problems:
            for problem in problems:
                log.error("memwarden: Heroku restart impossible: %s", problem)
            return self._fall_back()
        try:
            answer = call(
                "DELETE",
                self.url,
                headers={
                    "Accept": ACCEPT,
                    "Authorization": f"Bearer {self._token.reveal()}",
                    "User-Agent": "memwarden",
                },
                what=f"Heroku restart of dyno {self.dyno}",
                refused={
                    401: "HEROKU_API_TOKEN was refused (expired or revoked?): create a new one",
                    403: "HEROKU_API_TOKEN may not restart dynos of this app: give its "
                    "account the operate permission on HEROKU_APP_NAME",
                    404: f"no app HEROKU_APP_NAME={self.app!r} with dyno DYNO={self.dyno!r}: "
                    "check HEROKU_APP_NAME",
                },
                timeout=self.timeout,
                retries=self.retries,
                deadline=self.deadline,
            )
        except ApiError as exc:
            log.error("memwarden: %s", exc)
            return self._fall_back()
        log.warning(
            "memwarden: Heroku is restarting dyno %s of %s (HTTP %d after %d tries): %s",
            self.dyno,
            self.app,
            answer.status,
            answer.attempts,
            reason,
        )

    def _fall_back(self) -> None:
        if self._fell_back:
            return
        self._fell_back = True
        log.error("memwarden: restarting the local way instead (%s)", self.fallback.name)
        self.fallback.restart("heroku API unavailable")


def make(config: Config) -> HerokuRestarter:
    return HerokuRestarter.from_env(config, os.environ, ExitRestarter(config.exit_code))


def checks(config: Config, env: Mapping[str, str]) -> list[str]:
    """``memwarden check`` on Heroku: what to enable for the API restart."""
    on_heroku = bool(env.get("DYNO"))
    if config.restart == "heroku":
        restarter = HerokuRestarter.from_env(config, env, ExitRestarter(config.exit_code))
        return restarter.problems()
    if on_heroku and config.restart in ("signal", "exit"):
        return [
            "on Heroku a worker that exits counts as a crash (repeated ones wait in a crash "
            "cool-off): MEMWARDEN_RESTART=heroku restarts the dyno through the API instead "
            "(not needed under `memwarden run`, which restarts its command itself)"
        ]
    return []
