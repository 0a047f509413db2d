"""A web app for the Gunicorn bench and tests: ``/leak`` keeps ``LEAK_BYTES`` per request
(written, so resident), ``/`` does not. ``app`` is WSGI (sync, gthread), ``asgi`` is ASGI
(``uvicorn_worker.UvicornWorker``)."""

from __future__ import annotations

import os
from typing import Any

LEAK_BYTES = int(os.environ.get("LEAK_BYTES", str(1 << 20)))
KEPT: list[bytearray] = []


def _serve(path: str) -> bytes:
    if path == "/leak":
        KEPT.append(bytearray(b"x") * LEAK_BYTES)
    return f"{os.getpid()} {len(KEPT)}\n".encode()


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = _serve(environ.get("PATH_INFO", "/"))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = _serve(scope.get("path", "/"))
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
