"""Give memory back without a restart: ``gc.collect()``, then the allocator.

glibc keeps freed memory in its arenas (one per thread, up to 8 × cores) and only returns
the top of each heap on its own; ``malloc_trim(0)`` walks every arena and releases free
pages in the middle too (``MADV_DONTNEED``), which is what the stair-step of a fragmented
multi-threaded worker needs. Under jemalloc the same is ``mallctl("arena.<all>.purge")``.
Elsewhere (musl, macOS) reclaim is ``gc.collect()`` alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from memwarden import state

log = logging.getLogger(__name__)

MALLCTL_ARENAS_ALL = 4096  # jemalloc's "all arenas" index


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


@cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except OSError:  # pragma: no cover - static or exotic builds
        return None


@cache
def glibc_version() -> str | None:
    libc = _libc()
    fn = getattr(libc, "gnu_get_libc_version", None) if libc else None
    if fn is None:
        return None
    fn.restype = ctypes.c_char_p
    version: bytes = fn()
    return version.decode()


@cache
def _jemalloc_mallctl() -> Callable[..., int] | None:
    libc = _libc()
    fn = getattr(libc, "mallctl", None) if libc else None
    if fn is None:
        for name in ("jemalloc", "jemalloc.so.2"):
            path = ctypes.util.find_library(name) if "." not in name else name
            if path and _loaded(path):
                try:
                    fn = ctypes.CDLL(path).mallctl
                    break
                except (OSError, AttributeError):
                    continue
    if fn is None:
        return None
    fn.restype = ctypes.c_int
    return fn


def _loaded(fragment: str) -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any(fragment in line for line in f)
    except OSError:
        return False


def jemalloc_active() -> bool:
    """True when jemalloc is the allocator (LD_PRELOAD or linked), by its ``mallctl``."""
    return _jemalloc_mallctl() is not None


def mallinfo2() -> dict[str, int] | None:
    """glibc heap figures: ``arena`` (heap bytes from the OS), ``uordblks`` (in use),
    ``fordblks`` (free inside the heap: fragmentation), ``hblkhd`` (mmapped), ``keepcost``."""
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc else None
    if fn is None or jemalloc_active():
        return None
    fn.restype = _Mallinfo2
    info = fn()
    return {name: int(getattr(info, name)) for name, *_ in _Mallinfo2._fields_}


def malloc_trim() -> bool:
    """Return free heap pages to the OS; True if the allocator released any."""
    mallctl = _jemalloc_mallctl()
    if mallctl is not None:
        key = f"arena.{MALLCTL_ARENAS_ALL}.purge".encode()
        return mallctl(key, None, None, None, ctypes.c_size_t(0)) == 0
    libc = _libc()
    fn = getattr(libc, "malloc_trim", None) if libc else None
    if fn is None:
        return False
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(fn(0))


def allocator() -> dict[str, object]:
    """What ``memwarden check`` reports about the allocator."""
    return {
        "name": "jemalloc" if jemalloc_active() else ("glibc" if glibc_version() else "other"),
        "glibc": glibc_version(),
        "jemalloc": jemalloc_active(),
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
        "ld_preload": os.environ.get("LD_PRELOAD"),
    }


@dataclass(frozen=True)
class Reclaimed:
    before: int
    after: int
    collected: int  # objects gc found unreachable
    trimmed: bool
    seconds: float

    @property
    def freed(self) -> int:
        return max(0, self.before - self.after)


def reclaim(measure: Callable[[], int]) -> Reclaimed:
    """``gc.collect()`` then ``malloc_trim(0)``; ``measure`` gives bytes before and after."""
    start = time.perf_counter()
    before = measure()
    collected = gc.collect()
    trimmed = malloc_trim()
    after = measure()
    return Reclaimed(before, after, collected, trimmed, time.perf_counter() - start)


class ReclaimRequests:
    """Reclaim on request from another process: a FIFO at ``path`` and a daemon thread that
    runs ``on_request()`` for every write to it (several writes waiting: one run).

    A prefork pool's memory is in its children, so the worker's cheapest remedy is a
    reclaim *there*, while their jobs go on in their main threads (``gc`` takes the GIL,
    ``malloc_trim`` the allocator's arena locks: both are safe beside running code). The
    thread opens the FIFO read-write, so a writer never blocks and a FIFO with no live
    reader (its process gone) refuses writers (:func:`ask_to_reclaim` returns False).
    """

    def __init__(self, path: str, on_request: Callable[[], object]) -> None:
        self.path = path
        self.on_request = on_request

    def listen(self) -> ReclaimRequests:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        fd = state.make_fifo(self.path)
        threading.Thread(
            target=self._serve, args=(fd,), name="memwarden-reclaim", daemon=True
        ).start()
        return self

    def _serve(self, fd: int) -> None:
        while True:
            try:
                if not os.read(fd, 4096):
                    return
            except OSError:
                return
            try:
                self.on_request()
            except Exception:  # never let the listener die of one bad reclaim
                log.exception("memwarden: reclaim on request failed")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def ask_to_reclaim(path: str) -> bool:
    """Ask the process listening at ``path`` (:class:`ReclaimRequests`) to reclaim; False
    when nothing of ours listens there (no such FIFO, its process gone, a planted file)."""
    return state.poke_fifo(path)
