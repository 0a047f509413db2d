"""Append-only event records, one JSON object per line (schema: :mod:`memwarden.records`,
docs/journal.md).

Every record has ``event``, ``ts`` (epoch seconds) and ``pid``. The last records are kept in
memory too, for ``status`` and tests. Extra sinks (a Redis stream, metrics) get every record.

The file is shared by every process that writes it (a pool's children and their parent,
several workers): each line goes out with ``O_APPEND`` while the writer holds an ``flock``
on the file, so lines never interleave and one writer at a time rotates it by size
(``path.1`` … ``path.N``). A writer whose file was rotated by another process notices by
inode and re-opens. A line cut short (a full disk) is cut off again under the lock: what is
left is whole lines only. Waiting for the lock is bounded (a process of another user may
hold it): past that, the line is written without it. A journal path that is a symlink is
followed only when the link is ours (or root's); one planted by another user is refused.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memwarden.config import Config

from memwarden.state import SAY_AGAIN_AFTER, Said

log = logging.getLogger("memwarden")

Sink = Callable[[dict[str, Any]], None]


def open_journal(path: str) -> int:
    """An append fd on ``path`` (read-write where allowed, to look at its last byte): a
    symlink there is followed only when it is ours (or root's), the file must be a regular
    one (raises ``OSError``)."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        link = None
    if link is not None and stat.S_ISLNK(link.st_mode):
        if link.st_uid not in (os.getuid(), 0):
            raise OSError(errno.EPERM, f"a symlink made by uid {link.st_uid}: refused", path)
    else:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o644)
    except PermissionError:  # write-only to us: no look at its last byte
        fd = os.open(path, flags & ~os.O_RDWR | os.O_WRONLY, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


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
        #: Longest wait for the file's lock before a line is written without it (s).
        self.lock_wait = 2.0
        self._held_elsewhere_until = 0.0
        self._failing = Said()

    @classmethod
    def of(cls, config: Config) -> Journal:
        """The journal ``config`` names: its ``journal`` path, rotated past
        ``journal_max_bytes`` (unset: the default size)."""
        max_bytes = config.size("journal_max_bytes")
        return cls(config.journal, max_bytes=max_bytes) if max_bytes else cls(config.journal)

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
                if self._failing.due():  # once, then once a minute while it lasts
                    log.warning("memwarden: journal %s not written: %s", self.path, exc)
            else:
                if self._failing.over():
                    log.warning("memwarden: journal %s written again", self.path)
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
            for _ in range(3):  # another process may rotate between our look and our lock
                locked = self._flock()
                if locked and self._rotated_away():
                    self._unlock()
                    self._reopen()
                    continue
                try:
                    size = os.fstat(self._fd).st_size
                    if size > 0 and size + len(line) > self.max_bytes and locked:
                        self._rotate()  # then lock the fresh file and go again
                        continue
                    self._write_whole(line, size, locked)
                    return
                finally:
                    if locked:
                        self._unlock()
            self._write_whole(line, os.fstat(self._fd).st_size, False)

    def _flock(self) -> bool:
        """Take the file's ``flock``; False when :attr:`lock_wait` went by without it. After
        such a wait (someone else holds it: another user can, on a file they may read), only
        one quick try per line for the next minute: a job's end never waits on it again."""
        patient = time.monotonic() >= self._held_elsewhere_until
        deadline = time.monotonic() + (self.lock_wait if patient else 0.0)
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    if patient:
                        self._held_elsewhere_until = time.monotonic() + SAY_AGAIN_AFTER
                        log.warning(
                            "memwarden: journal %s locked by another process for %gs: "
                            "writing without the lock for a minute",
                            self.path,
                            self.lock_wait,
                        )
                    return False
                time.sleep(0.0005)

    def _unlock(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _write_whole(self, line: bytes, size: int, locked: bool) -> None:
        """Write ``line`` whole at the end of the file, or leave no part of it there. The
        lock is held when ``locked``: then ``size`` is where it starts, and anything written
        by a previous writer that died mid-line is closed with a newline first."""
        if locked and size > 0 and self._last_byte(size) not in (b"\n", None):
            line = b"\n" + line
        view = memoryview(line)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            if locked and len(view) < len(line):
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, size)
            raise

    def _last_byte(self, size: int) -> bytes | None:
        try:
            return os.pread(self._fd, 1, size - 1)
        except OSError:  # opened write-only
            return None

    def _rotated_away(self) -> bool:
        try:
            return os.stat(self.path or "").st_ino != self._ino
        except OSError:
            return True

    def _reopen(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = -1
        path = self.path or ""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fd = open_journal(path)
        self._ino = os.fstat(self._fd).st_ino
        self._pid = os.getpid()

    def _rotate(self) -> None:
        """Shift ``path`` → ``path.1`` → … (the oldest falls off), then a fresh file. Only
        with the lock held, by one writer at a time."""
        path = self.path or ""
        if self.backups > 0:
            for n in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{path}.{n}", f"{path}.{n + 1}")
            os.replace(path, f"{path}.1")
        else:
            os.ftruncate(self._fd, 0)
            return
        self._unlock()
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
