"""Calling a platform API (Heroku, Kubernetes) from a restart: retries, and secrets kept secret.

A restart runs once, late, with little time left, so one call gets a few tries with back-off
on the answers worth retrying (429, 5xx, a timeout or a refused connection) and stops at
once on the ones that are not (401, 403, 404: a setting to fix). One deadline in wall time
holds for the whole call, retries included: a server that trickles bytes cannot hold a
restart. Tokens travel in a :class:`Secret`, whose repr and str never show the value; error
messages name the variable to fix, never its value, and what a server sends back is redacted
before it is shown (it may echo our token). ``httpx`` (extras ``heroku`` / ``kubernetes``)
is imported on use.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memwarden import redact

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

    def __init__(
        self, message: str, status: int | None = None, retry_after: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        #: The server's Retry-After on a refused status (a 429 the caller waits out itself).
        self.retry_after = retry_after


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
    return float(min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF))


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
    deadline: float | None = None,
) -> Answer:
    """One API call with retries; returns the 2xx :class:`Answer` or raises :class:`ApiError`.

    ``refused`` maps the statuses that must not be retried (401, 403, 404) to the message
    naming what to fix. ``what`` names the call in logs ("Heroku dyno restart"). Time is
    wall time, however slowly the server answers: ``timeout`` bounds each try from connect
    to last byte, ``deadline`` (seconds from now; default: every try and back-off) the
    whole call, retries included. A request that cannot be sent at all (a malformed URL, a
    token that is not ASCII) raises :class:`ApiError` at once.
    """
    secrets = _credentials(headers)
    attempts = retries + 1
    if deadline is None:
        deadline = attempts * timeout + sum(backoff(n) for n in range(1, attempts))
    start = time.monotonic()
    end = start + deadline
    last, tries = "no try: no time left", 0
    for attempt in range(1, attempts + 1):
        left = end - time.monotonic()
        if left <= 0:
            break
        tries = attempt
        retry_after = None
        outcome = _one_try(method, url, headers, json, min(timeout, left), verify, what, secrets)
        if isinstance(outcome, str):  # no answer: timeouts, refused connections, TLS
            last = outcome
        else:
            status, text, retry_after = outcome
            if 200 <= status < 300:
                return Answer(status, attempt, text)
            if status in refused:
                message = f"{what}: HTTP {status}: {refused[status]}"
                raise ApiError(message, status, retry_after) from None
            if status not in RETRY_STATUSES:
                body = redact.text(text, known=secrets)
                raise ApiError(f"{what}: HTTP {status}: {_short(body)}", status) from None
            last = f"HTTP {status}"
        if attempt < attempts:
            pause = backoff(attempt, retry_after)
            if time.monotonic() + pause >= end:
                break
            log.warning(
                "memwarden: %s failed (%s), try %d of %d in %.1fs",
                what,
                last,
                attempt,
                attempts,
                pause,
            )
            time.sleep(pause)
    took = time.monotonic() - start
    raise ApiError(f"{what}: gave up after {tries} tries (last: {last}) in {took:.1f}s")


def _one_try(
    method: str,
    url: str,
    headers: Mapping[str, str],
    json: Any,
    limit: float,
    verify: Any,
    what: str,
    secrets: list[str],
) -> tuple[int, str, str | None] | str:
    """One request, given at most ``limit`` seconds of wall time: (status, body,
    Retry-After), or a short text saying why there was no answer. It runs in a thread of its
    own, left behind (a daemon) if the server still trickles when time is up."""
    import httpx

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            with httpx.Client(timeout=limit, verify=verify) as client:
                response = client.request(method, url, headers=dict(headers), json=json)
                box["answer"] = (
                    response.status_code,
                    response.text,
                    response.headers.get("Retry-After"),
                )
        except httpx.TransportError as exc:
            box["failed"] = type(exc).__name__
        except Exception as exc:  # the request cannot be made: a setting to fix
            box["error"] = exc

    thread = threading.Thread(target=run, name="memwarden-api", daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        return f"no whole answer within {limit:.1f}s"
    if "error" in box:
        exc = box["error"]
        shown = redact.text(str(exc), known=secrets)
        raise ApiError(f"{what}: the request cannot be sent ({type(exc).__name__}: {shown})")
    if "failed" in box:
        return str(box["failed"])
    answer: tuple[int, str, str | None] = box["answer"]
    return answer


def _credentials(headers: Mapping[str, str]) -> list[str]:
    """The secret values we send (``Authorization: Bearer X``: the whole value and ``X``),
    to be cut out of whatever the server sends back."""
    found = []
    for name, value in headers.items():
        if redact.secret_name(name):
            found += [value, value.partition(" ")[2]]
    return found


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"
