"""``guard(app)``: one :class:`CeleryGuard` per app, wired to Celery's signals, builds the
worker's side in the main process and a pool child's side in each child; both write the
``job`` records of the tasks that run where they are."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, Unpack

from celery import Celery, signals

from memwarden.config import Config, Options
from memwarden.integrations.celery.child import PoolChild
from memwarden.integrations.celery.common import (
    hook_guard,
    no_loss_problems,
    redis_visibility_note,
)
from memwarden.integrations.celery.worker import IntakeStep, WorkerSide
from memwarden.warden import Warden


class CeleryGuard:
    """The wardens of one Celery app's worker: built by its signals, one per process."""

    def __init__(self, app: Celery, poison_url: str | None = None, **options: Any) -> None:
        self.app = app
        self.options = options
        self.config = Config.from_env(**options)  # a bad setting fails at import, clearly
        self.worker = WorkerSide(app, self.config, poison_url)  # the main process
        self.child: PoolChild | None = None  # in a pool child, once it has started
        self._uid = f"memwarden-{id(self)}"

    @property
    def warden(self) -> Warden | None:
        """This process's warden: a pool child's own (None without a share), else the
        worker's (None before ``worker_init``)."""
        return self.child.warden if self.child is not None else self.worker.warden

    @property
    def pool(self) -> str:
        return self.worker.pool

    def __repr__(self) -> str:
        return f"CeleryGuard(pool={self.pool}, warden={self.warden!r})"

    def connect(self) -> CeleryGuard:
        worker = self.worker
        for sig, handler in (
            (signals.worker_init, worker._on_worker_init),
            (signals.worker_ready, worker._on_worker_ready),
            (signals.worker_shutdown, worker._on_worker_shutdown),
            (signals.task_received, worker._on_received),
            (signals.worker_process_init, self._on_process_init),
            (signals.worker_process_shutdown, self._on_process_shutdown),
            (signals.task_prerun, self._on_prerun),
            (signals.task_postrun, self._on_postrun),
            (signals.task_success, self._on_outcome),
            (signals.task_failure, self._on_outcome),
            (signals.task_retry, self._on_outcome),
        ):
            sig.connect(handler, weak=False, dispatch_uid=f"{self._uid}-{handler.__name__}")
        step = type(
            "MemwardenIntake",
            (IntakeStep,),
            {"worker": worker, "name": f"memwarden.intake.{self._uid}", "__module__": __name__},
        )
        self.app.steps["consumer"].add(step)
        return self

    # ------------------------------------------------------------ pool children
    @hook_guard
    def _on_process_init(self, **_: Any) -> None:
        main_pid = self.worker.main_pid
        if main_pid is None or os.getpid() == main_pid:
            return  # solo sends this signal in the main process
        self.child = PoolChild(self.config, self.worker.child_share, self.worker.files)

    @hook_guard
    def _on_process_shutdown(self, **_: Any) -> None:
        if self.child is not None:
            self.child.close()

    # ------------------------------------------------------------ every task
    @hook_guard
    def _on_prerun(self, task_id: Any = None, task: Any = None, **_: Any) -> None:
        warden = self.warden
        if warden is not None and task is not None:
            if self.worker.runs_tasks_here:
                self.worker.intake.started(task_id, task.name)  # held once a kill is decided
            queue = (getattr(task.request, "delivery_info", None) or {}).get("routing_key")
            extra = {"queue": queue} if queue else {}
            warden.job_started(task.name, task_id, **extra)

    @hook_guard
    def _on_outcome(self, sender: Any = None, **kwargs: Any) -> None:
        """Celery has stored the task's outcome: it has finished (threads, solo)."""
        if not self.worker.runs_tasks_here:
            return
        task_id = kwargs.get("task_id")
        if task_id is None:
            request = kwargs.get("request") or getattr(sender, "request", None)
            task_id = getattr(request, "id", None)
        if task_id is not None:
            self.worker.intake.finished(task_id)

    @hook_guard
    def _on_postrun(self, task_id: Any = None, **_: Any) -> None:
        if self.worker.runs_tasks_here:
            self.worker.intake.finished(task_id)  # an outcome stored nowhere (Reject, Ignore)
        warden = self.warden
        if warden is not None:
            warden.job_finished(task_id)


def guard(app: Celery, *, poison_url: str | None = None, **options: Unpack[Options]) -> CeleryGuard:
    """Guard ``app``'s workers. Options are the ``Config`` settings (``soft_limit="400MB"``,
    ``reclaim=False``, ...), else ``MEMWARDEN_*``; ``poison_url`` is the Redis for
    poison-job counts (default: the broker or result backend when it is Redis)."""
    return CeleryGuard(app, poison_url, **options).connect()


def check_app(spec: str) -> Callable[[Config, Mapping[str, str]], list[str]]:
    """A ``memwarden check`` extra for ``--celery-app proj.celery:app``."""
    from celery.app.utils import find_app

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as ``celery -A`` does
    app = find_app(spec)

    def celery_checks(config: Config, env: Mapping[str, str]) -> list[str]:
        out = [f"celery: JOBS CAN BE LOST: {p}" for p in no_loss_problems(app)]
        note = redis_visibility_note(app)
        if note:
            out.append(f"celery: {note}")
        return out

    return celery_checks
