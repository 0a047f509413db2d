"""Real memory behaviour for demos, tests and benchmarks (no framework needed).

- :func:`fragment`: several threads allocate mixed-size buffers (1–64 KiB, served by malloc
  from per-thread arenas), then free all but a sliver. RSS steps up and stays up: the
  glibc arena stair-step. ``malloc_trim(0)`` gets most of it back.
- :func:`leak`: memory kept for good, a real leak.
- :func:`spike`: a big transient allocation, freed before returning.
- :func:`cache_fill`: a bounded cache that fills and stops growing (a high-water mark).
"""

from __future__ import annotations

import random
import threading

MB = 1024 * 1024

#: What the workloads keep, module-wide, so it outlives the job (as real bloat does).
KEPT: list[bytes] = []
LEAKED: list[bytes] = []
CACHE: dict[int, bytes] = {}


def fragment(
    mb: int = 32, threads: int = 4, keep_every: int = 20, seed: int = 0, together: bool = False
) -> int:
    """Allocate about ``mb`` MiB across ``threads`` threads, keep 1 in ``keep_every``.

    Returns the bytes kept. The rest is freed but mostly stays in the process's RSS (under
    glibc; jemalloc gives a thread's memory back as the thread exits: ``threads=0``
    fragments the calling thread's heap, as a job running in a worker's main thread does).
    ``together``: every thread holds its share until all have allocated, so each has an
    arena of its own (the whole stair-step, whatever the machine's load; a higher peak).
    """
    per_thread = mb * MB // max(1, threads)  # threads=0: one share, here
    kept_total = [0]
    lock = threading.Lock()
    # Without it, on a busy machine a thread can finish before the next starts, and the next
    # reuses its arena: less RSS stays.
    all_allocated = threading.Barrier(max(1, threads) if together else 1)

    def work(i: int) -> None:
        rnd = random.Random(seed * 1000 + i)
        live: list[bytes] = []
        mine: list[bytes] = []
        used = 0
        while used < per_thread:
            size = rnd.randint(1024, 64 * 1024)
            buf = b"\x01" * size  # filled, so every page is really touched
            used += size
            if rnd.randrange(keep_every) == 0:
                mine.append(buf)
            else:
                live.append(buf)
        all_allocated.wait(60)
        del live
        with lock:
            KEPT.extend(mine)
            kept_total[0] += sum(len(b) for b in mine)

    if threads <= 0:
        work(0)
        return kept_total[0]
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return kept_total[0]


def leak(mb: float = 1.0, chunk: int = 64 * 1024) -> int:
    """Keep ``mb`` MiB forever, in ``chunk``-sized pieces. Returns bytes leaked."""
    total = int(mb * MB)
    n = max(1, total // chunk)
    LEAKED.extend(b"\x02" * chunk for _ in range(n))
    return n * chunk


def spike(mb: int = 64) -> int:
    """Allocate ``mb`` MiB, touch it, free it. Returns bytes allocated."""
    buf = bytearray(b"\x03") * (mb * MB)
    size = len(buf)
    del buf
    return size


def cache_fill(key: int, size: int = 256 * 1024, capacity: int = 64) -> int:
    """A bounded cache: grows until ``capacity`` entries, then stays. Returns its size."""
    if len(CACHE) < capacity or key in CACHE:
        CACHE[key % capacity] = b"\x04" * size
    return sum(len(v) for v in CACHE.values())


def forget() -> None:
    """Drop everything the workloads kept."""
    KEPT.clear()
    LEAKED.clear()
    CACHE.clear()
