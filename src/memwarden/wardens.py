"""Which processes run a warden that takes hard kills: its watchdog thread's native name.

A process that leaves a hard kill to a larger sibling (``Warden._a_sibling_holds_it``) or
lets the largest sibling judge a shared figure (Huey's process workers) must count only
siblings that will really act: a framework's main process or helper (Huey's consumer and
its scheduler, Dramatiq's main process) runs none, and a kill left to it is a kill nobody
makes — the kernel's OOM killer makes it. The watchdog names its own thread (Linux
``PR_SET_NAME``: ``/proc/<pid>/task/<tid>/comm``, nothing else of the process changes), so
any process of the same user can tell; a process ended or a watchdog stopped shows none.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

from memwarden.gauges.proc import stat_fields

#: The watchdog thread's native name (at most 15 bytes).
NAME = b"memwarden"
PR_SET_NAME = 15


def name_this_thread() -> None:
    """Give the calling (watchdog) thread its native name; nothing where there is none."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(NAME), 0, 0, 0)


def runs_warden(pid: int) -> bool:
    """True when process ``pid`` has a live watchdog thread that takes hard kills."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/comm", "rb") as f:
            if f.read().strip() == NAME:
                return True
    return False


#: ``PF_EXITING`` in ``/proc/<pid>/stat``'s flags: the task is on its way out.
PF_EXITING = 0x4
SIGKILL_BIT = 1 << (9 - 1)


def being_killed(pid: int) -> bool:
    """True when process ``pid`` has a SIGKILL pending or is exiting: a warden that killed
    its own process may already be gone from its threads while the memory is still there
    (a busy machine runs the exit late), so it no longer :func:`runs_warden`."""
    fields = stat_fields(pid)
    try:
        with open(f"/proc/{pid}/status") as f:
            pending = {k: v for k, _, v in (line.partition(":") for line in f)}
        flags = int(fields[6]) if fields is not None else 0
        shared = int(pending.get("ShdPnd", "0").strip() or "0", 16)
    except (OSError, ValueError, IndexError):
        return False
    return bool(shared & SIGKILL_BIT or flags & PF_EXITING)


def zombie(pid: int) -> bool:
    """True when process ``pid`` has ended and waits to be reaped (it holds no memory)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] == b"Z"
