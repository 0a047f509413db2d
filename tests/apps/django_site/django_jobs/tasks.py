"""Tasks of memwarden's Django test app; each keeps counts in ``mw_counts`` (made by the
tests): ``started``, ``done`` by task number."""

import time

from django.db import connection

try:
    from django.tasks import task  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from django_tasks import task  # type: ignore[no-redef,unused-ignore]

MB = 1024 * 1024
#: Memory a task keeps after it ends (``ballast``): the process stays over its soft limit.
KEPT: list[bytearray] = []


def bump(n: int, what: str) -> int:
    with connection.cursor() as cur:
        cur.execute(
            "INSERT INTO mw_counts (n, what, count) VALUES (%s, %s, 1) "
            "ON CONFLICT (n, what) DO UPDATE SET count = mw_counts.count + 1 RETURNING count",
            [n, what],
        )
        return int(cur.fetchone()[0])


def grow(mb: int) -> bytearray:
    block = bytearray(mb * MB)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return block


@task()
def note(n: int) -> int:
    bump(n, "started")
    bump(n, "done")
    return n


@task()
def hog(n: int, mb: int, first_only: bool = False) -> int:
    """Grows to ``mb`` MiB and stays (until killed); with ``first_only``, only its first run."""
    runs = bump(n, "started")
    if not first_only or runs == 1:
        held = [grow(8) for _ in range(mb // 8)]
        time.sleep(120)
        del held
    bump(n, "done")
    return n


@task()
def ballast(n: int, mb: int) -> int:
    """Leaves ``mb`` MiB behind in this process."""
    bump(n, "started")
    KEPT.append(grow(mb))
    bump(n, "done")
    return n


@task()
def nap(n: int, seconds: float) -> int:
    bump(n, "started")
    time.sleep(seconds)
    bump(n, "done")
    return n
