"""Append-only event records, one JSON object per line (schema: DESIGN.md "Journal").

Every record has ``event``, ``ts`` (epoch seconds) and ``pid``. Lines are written with one
``os.write`` on an ``O_APPEND`` fd, so pool children and their parent can share one file
without tearing lines. The file rotates by size (``path.1`` … ``path.3``); a writer whose
file was rotated by another process notices by inode and re-opens. The last records are
kept in memory too, for ``status`` and tests. Extra sinks (a Redis stream, metrics) get
every record.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("memwarden")

Sink = Callable[[dict[str, Any]], None]


class Journal:
    """Write records to a JSONL file (optional), a ring buffer and any sinks."""

    def __init__(
        self,
        path: str | None = None,
        *,
        max_bytes: int = 20 * 1000**2,
        backups: int = 3,
        ring: int = 1000,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=ring)
        self.sinks: list[Sink] = []
        self._lock = threading.Lock()
        self._fd = -1
        self._ino = -1
        self._pid = -1

    def __repr__(self) -> str:
        return f"Journal({self.path!r})"

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {"event": event, "ts": round(time.time(), 6), "pid": os.getpid()}
        record.update(fields)
        self.recent.append(record)
        if self.path:
            try:
                self._append((json.dumps(record, default=str) + "\n").encode())
            except OSError as exc:
                log.warning("memwarden: journal %s not written: %s", self.path, exc)
        for sink in list(self.sinks):
            try:
                sink(record)
            except Exception as exc:  # a sink must never break the warden
                log.warning("memwarden: journal sink failed: %s", exc)
        return record

    def _append(self, line: bytes) -> None:
        assert self.path is not None
        with self._lock:
            if self._fd < 0 or self._pid != os.getpid() or self._rotated_away():
                self._reopen()
            if os.fstat(self._fd).st_size + len(line) > self.max_bytes:
                self._rotate()
            os.write(self._fd, line)

    def _rotated_away(self) -> bool:
        try:
            return os.stat(self.path or "").st_ino != self._ino
        except OSError:
            return True

    def _reopen(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        parent = os.path.dirname(os.path.abspath(self.path or "."))
        os.makedirs(parent, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.path or "", flags, 0o644)
        self._ino = os.fstat(self._fd).st_ino
        self._pid = os.getpid()

    def _rotate(self) -> None:
        path = self.path or ""
        for n in range(self.backups - 1, 0, -1):
            if os.path.exists(f"{path}.{n}"):
                os.replace(f"{path}.{n}", f"{path}.{n + 1}")
        if self.backups > 0:
            os.replace(path, f"{path}.1")
        else:
            os.truncate(path, 0)
        self._reopen()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0 and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = -1


def read_records(lines: Iterator[str] | list[str]) -> tuple[list[dict[str, Any]], int]:
    """Parse JSONL; returns (records, number of malformed or truncated lines skipped)."""
    records, bad = [], 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict) and "event" in record:
            records.append(record)
        else:
            bad += 1
    return records, bad
