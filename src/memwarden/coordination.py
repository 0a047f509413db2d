"""Acting only once: in this process (a thread lock) and on this host (a file lock).

A restart is taken by whoever gets the lock first; everybody else keeps serving. The host
lock is an ``flock`` on a file in the state dir: the kernel drops it when its holder dies,
so a crashed warden cannot block the next one. Fleet-wide locks (Redis) implement the
same two methods.
"""

from __future__ import annotations

import fcntl
import os
import threading
from typing import Protocol


class RestartLock(Protocol):
    def try_acquire(self) -> bool: ...

    def release(self) -> None: ...


class HostLock:
    """An exclusive, non-blocking ``flock`` on ``path``; held until released or death."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1

    def try_acquire(self) -> bool:
        if self._fd >= 0:
            return True
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


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
