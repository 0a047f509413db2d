"""A real HTTP server on 127.0.0.1 standing in for a platform API (Heroku, Kubernetes).

It records every request (method, path, headers, body) and answers from a script: each
request takes the next step (a status, a timeout, a hook), the last step repeats.

    with FakeAPI() as api:
        api.script(500, 503, 202)          # two server errors, then success
        api.script(Stall(2.0), 202)        # no answer for 2 s (a client timeout), then 202
        ...
        api.requests[0].headers["Authorization"]

``FakeAPI(tls=(cert, key))`` serves HTTPS with that certificate (see :func:`self_signed`).
"""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    t: float

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Reply:
    status: int
    body: Any = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Stall:
    """Answer nothing for ``seconds`` (longer than the client's timeout), then 504."""

    seconds: float


@dataclass
class Hook:
    """Run ``fn(request)`` (e.g. send the "dyno" its SIGTERM), then answer ``reply``."""

    fn: Callable[[Request], None]
    reply: Reply


Step = int | Reply | Stall | Hook


class FakeAPI:
    def __init__(self, tls: tuple[Path, Path] | None = None) -> None:
        self.requests: list[Request] = []
        self._steps: list[Step] = [Reply(200)]
        self._lock = threading.Lock()
        self._closing = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Request(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    time.time(),
                )
                step = api._next(request)
                if isinstance(step, Stall):
                    api._closing.wait(step.seconds)
                    step = Reply(504)
                if isinstance(step, Hook):
                    step.fn(request)
                    step = step.reply
                reply = step if isinstance(step, Reply) else Reply(step)
                data = json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def script(self, *steps: Step) -> FakeAPI:
        with self._lock:
            self._steps = list(steps)
            self.requests.clear()
        return self

    def _next(self, request: Request) -> Step:
        with self._lock:
            self.requests.append(request)
            return self._steps.pop(0) if len(self._steps) > 1 else self._steps[0]

    def __enter__(self) -> FakeAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


def self_signed(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate for ``host`` (its own CA) and its key, made by the openssl command."""
    cert, key = directory / "ca.crt", directory / "tls.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "1", "-subj", f"/CN={host}", "-addext", f"subjectAltName=IP:{host}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class Fallback:
    """A restarter's local way back (its fallback), recorded instead of ending the test
    process: it runs only when the API call failed."""

    def __init__(self, name: str = "exit") -> None:
        self.name = name
        self.calls: list[str] = []

    def restart(self, reason: str) -> None:
        self.calls.append(reason)
