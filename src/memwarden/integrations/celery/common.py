"""What both sides of a Celery worker use: the hook boundary, the poison error, the files
by which the worker speaks to its pool children, and the no-loss settings checks."""

from __future__ import annotations

import contextlib
import logging
import os

from billiard.exceptions import SoftTimeLimitExceeded, Terminated, TimeLimitExceeded
from celery import Celery

from memwarden.gauges.proc import alive
from memwarden.warden import swallow_but

#: Celery's (billiard's) control flow from its signal handlers: a soft time limit, a hard
#: one, a revoke's terminate. Raised into whatever runs, our hooks too: it passes through.
HOST_CONTROL_FLOW: tuple[type[BaseException], ...] = (
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    Terminated,
)
hook_guard = swallow_but(*HOST_CONTROL_FLOW)

log = logging.getLogger("memwarden")


class PoisonJobError(Exception):
    """A task that was running at ``poison_kills`` hard kills of its worker: quarantined."""

    # Result backends store an exception by module and name: the path it always had.
    __module__ = "memwarden.integrations.celery"


class ChildFiles:
    """The files in ``MEMWARDEN_STATE_DIR`` by which the worker speaks to a pool child,
    named by its pid: a recycle flag (leave after this task) and a reclaim FIFO."""

    def __init__(self, state_path: str) -> None:
        self.state_path = state_path

    def recycle_flag(self, pid: int) -> str:
        return os.path.join(self.state_path, f"celery-recycle-{pid}")

    def reclaim_fifo(self, pid: int) -> str:
        return os.path.join(self.state_path, f"celery-reclaim-{pid}")

    def forget_stale(self) -> None:
        """Recycle flags and reclaim FIFOs left by children that are gone (pids get reused)."""
        with contextlib.suppress(OSError):
            for name in os.listdir(self.state_path):
                pid = name.removeprefix("celery-recycle-").removeprefix("celery-reclaim-")
                if pid != name and pid.isdigit() and not alive(int(pid)):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.state_path, name))


def no_loss_problems(app: Celery) -> list[str]:
    """Settings that let a killed task vanish, each with its fix (empty: none)."""
    conf = app.conf
    problems = []
    if not conf.task_acks_late:
        problems.append(
            "task_acks_late is off: a task is acknowledged as it starts, so one running when "
            "the worker is killed is lost. Set task_acks_late = True"
        )
    if not conf.task_reject_on_worker_lost:
        problems.append(
            "task_reject_on_worker_lost is off: a task whose pool child is killed is marked "
            "FAILED instead of going back to the queue. Set task_reject_on_worker_lost = True"
        )
    for name, task in sorted(app.tasks.items()):
        if name.startswith("celery."):
            continue
        if conf.task_acks_late and task.__class__.__dict__.get("acks_late") is False:
            problems.append(f"task {name} sets acks_late=False: it is lost if killed")
        if conf.task_reject_on_worker_lost and (
            task.__class__.__dict__.get("reject_on_worker_lost") is False
        ):
            problems.append(f"task {name} sets reject_on_worker_lost=False: a kill fails it")
    return problems


def redis_visibility_note(app: Celery) -> str | None:
    """With the Redis broker a killed worker's tasks come back after ``visibility_timeout``."""
    url = str(app.conf.broker_url or "")
    if not url.startswith(("redis://", "rediss://", "redis+socket://")):
        return None
    vt = (app.conf.broker_transport_options or {}).get("visibility_timeout", 3600)
    return (
        f"Redis broker: tasks of a worker killed outside memwarden (kernel OOM, kill -9) "
        f"come back after visibility_timeout ({vt:g} s); tasks running longer than that are "
        "delivered twice"
    )
