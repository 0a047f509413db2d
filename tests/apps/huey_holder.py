"""The test app (:mod:`huey_app`), whose processes hold memory when told: SIGUSR1 makes the
process that gets it take ``HUEY_TEST_HOLD_MB`` MiB (one buffer, every page touched),
SIGUSR2 frees it. Sent to the consumer's main process or to its scheduler (processes that
run no task and no warden) after the workers were forked, it makes that process the largest
of the cgroup while the workers do not share what it holds. Run as
``huey_consumer huey_holder.huey``.

A signal handler, not a thread: the consumer forks its children after the import, and a
thread's locks held at that instant would stay held in them.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from huey_app import huey  # noqa: F401  (the consumer's huey; the tasks register with it)

from memwarden import workload

MB = int(os.environ.get("HUEY_TEST_HOLD_MB", "0"))
HELD: list[bytearray] = []


def hold(signum: int, frame: Any) -> None:
    if not HELD:
        HELD.append(bytearray(b"\x07") * (MB * workload.MB))


def release(signum: int, frame: Any) -> None:
    HELD.clear()


signal.signal(signal.SIGUSR1, hold)
signal.signal(signal.SIGUSR2, release)
