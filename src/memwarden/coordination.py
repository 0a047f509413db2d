"""Acting only once: in this process (a thread lock) and on this host (a file lock).

A restart is taken by whoever gets the lock first; everybody else keeps serving. The host
lock is an ``flock`` on a file in the state dir: the kernel drops it when its holder dies,
so a crashed warden cannot block the next one. Fleet-wide locks (Redis) implement the
same two methods.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from typing import Protocol

from memwarden import state
from memwarden.state import Said

log = logging.getLogger("memwarden")


class RestartLock(Protocol):
    def try_acquire(self) -> bool: ...

    def release(self) -> None: ...


class HostLock:
    """An exclusive, non-blocking ``flock`` on ``path``; held until released or death.

    The file is opened without following symlinks and only if it is a regular file of ours
    (:func:`memwarden.state.open_file`). A lock that cannot be used at all (a state dir
    gone, read-only or refused) does not stop a restart: it is said (once, then once a
    minute) and the restart goes on without it, as a fleet lock does when Redis is down.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._unusable = Said()

    def try_acquire(self) -> bool:
        if self._fd >= 0:
            return True
        try:
            fd = state.open_file(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            return self._without(exc)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False  # another warden of this host is restarting
        except OSError as exc:
            os.close(fd)
            return self._without(exc)
        self._fd = fd
        self._unusable.over()
        with contextlib.suppress(OSError):  # the pid is for people; the flock is the lock
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        return True

    def _without(self, exc: OSError) -> bool:
        if self._unusable.due():
            log.error(
                "memwarden: host lock %s unusable (%s): restarting without it (other "
                "wardens of this host may restart at the same time). `memwarden check` "
                "says where state lives.",
                self.path,
                exc.strerror or exc,
            )
        return True

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class Once:
    """Thread-safe "first caller wins" over a chain of locks (host, then fleet)."""

    def __init__(self, *locks: RestartLock) -> None:
        self._mutex = threading.Lock()
        self._locks = list(locks)
        self.taken = False

    def try_take(self) -> bool:
        with self._mutex:
            if self.taken:
                return False
            held: list[RestartLock] = []
            for lock in self._locks:
                if not lock.try_acquire():
                    for h in reversed(held):
                        h.release()
                    return False
                held.append(lock)
            self.taken = True
            return True

    def give_back(self) -> None:
        with self._mutex:
            if self.taken:
                for lock in reversed(self._locks):
                    lock.release()
                self.taken = False
