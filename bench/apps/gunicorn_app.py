"""A web app for the Gunicorn bench and tests: ``/leak`` keeps ``LEAK_BYTES`` per request
(written, so resident), ``/`` does not, ``/hog?<bytes>`` holds that much for 30 s (one
worker past the hard limit at once). ``app`` is WSGI (sync, gthread), ``asgi`` is ASGI
(``uvicorn_worker.UvicornWorker``). ``BIG_OBJECTS=n``: n small lists made at import, the
module state of a big app (``--preload``: shared by the workers, copy-on-write)."""

from __future__ import annotations

import os
import time
from typing import Any

LEAK_BYTES = int(os.environ.get("LEAK_BYTES", str(1 << 20)))
KEPT: list[bytearray] = []
BIG = [[i, str(i)] for i in range(int(os.environ.get("BIG_OBJECTS", "0")))]


def _serve(path: str, query: str = "") -> bytes:
    if path == "/leak":
        KEPT.append(bytearray(b"x") * LEAK_BYTES)
    elif path == "/hog":
        held = bytearray(b"x") * int(query or 0)
        time.sleep(30)  # a sync sleep: the uvicorn worker is not used with /hog
        del held
    return f"{os.getpid()} {len(KEPT)}\n".encode()


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = _serve(environ.get("PATH_INFO", "/"), environ.get("QUERY_STRING", ""))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = _serve(scope.get("path", "/"), scope.get("query_string", b"").decode())
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
