"""Calling a platform API (Heroku, Kubernetes) from a restart: retries, and secrets kept secret.

A restart runs once, late, with little time left, so one call gets a few tries with back-off
on the answers worth retrying (429, 5xx, a timeout or a refused connection) and stops at
once on the ones that are not (401, 403, 404: a setting to fix). Tokens travel in a
:class:`Secret`, whose repr and str never show the value; error messages name the variable
to fix, never its value. ``httpx`` (extras ``heroku`` / ``kubernetes``) is imported on use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("memwarden")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF = 5.0


class Secret:
    """A credential: ``reveal()`` gives it to the one header that needs it, nothing else."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is not pickled")


class ApiError(RuntimeError):
    """A platform API call failed; the message says what to fix and holds no secret."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Answer:
    status: int
    attempts: int
    body: str


def backoff(attempt: int, retry_after: str | None = None) -> float:
    """Seconds before retry ``attempt`` (1, 2, …): 0.5, 1, 2, … or the server's Retry-After,
    never more than :data:`MAX_BACKOFF` (a restart has little time)."""
    if retry_after:
        try:
            return max(0.0, min(float(retry_after), MAX_BACKOFF))
        except ValueError:
            pass
    return min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF)


def call(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    what: str,
    refused: Mapping[int, str],
    json: Any = None,
    timeout: float = 5.0,
    retries: int = 3,
    verify: Any = True,
) -> Answer:
    """One API call with retries; returns the 2xx :class:`Answer` or raises :class:`ApiError`.

    ``refused`` maps the statuses that must not be retried (401, 403, 404) to the message
    naming what to fix. ``what`` names the call in logs ("Heroku dyno restart").
    """
    import httpx

    last = ""
    attempts = retries + 1
    with httpx.Client(timeout=timeout, verify=verify) as client:
        for attempt in range(1, attempts + 1):
            retry_after = None
            try:
                response = client.request(method, url, headers=dict(headers), json=json)
            except httpx.TransportError as exc:  # timeouts, refused connections, TLS
                last = f"{type(exc).__name__}"
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return Answer(status, attempt, response.text)
                if status in refused:
                    raise ApiError(f"{what}: HTTP {status}: {refused[status]}", status) from None
                if status not in RETRY_STATUSES:
                    raise ApiError(
                        f"{what}: HTTP {status}: {_short(response.text)}", status
                    ) from None
                last = f"HTTP {status}"
                retry_after = response.headers.get("Retry-After")
            if attempt < attempts:
                pause = backoff(attempt, retry_after)
                log.warning(
                    "memwarden: %s failed (%s), try %d of %d in %.1fs",
                    what,
                    last,
                    attempt,
                    attempts,
                    pause,
                )
                time.sleep(pause)
    raise ApiError(f"{what}: gave up after {attempts} tries (last: {last})")


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"
