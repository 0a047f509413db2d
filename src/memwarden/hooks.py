"""The integration contract: what an integration gives its warden, and what it may read.

An integration builds :class:`Hooks` (what it can do that the core cannot) and reads
:class:`WardenState` (``warden.state``: a snapshot, never written). Everything else it tells
the warden goes through a :class:`~memwarden.warden.Warden` method: ``job_started`` /
``job_finished``, ``record_job`` (a job measured elsewhere), ``attach`` (hooks for a warden
the user built), ``being_stopped`` (the framework's own stop), ``recovered`` (a kill took
only a pool child), ``reclaim_now`` and ``read``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memwarden.gauges import Sample
from memwarden.policy import Limits


@dataclass
class Hooks:
    """What an integration gives its warden: one callable per moment of the ladder, each
    optional. The warden calls them from a job hook or its watchdog thread; an exception
    in one is logged and the warden goes on (a host framework's control-flow exceptions
    pass through). In ladder order: reclaim → pause/resume → recycle → holds_elsewhere →
    drain → before_kill → kill; in_flight whenever the warden needs the jobs in hand."""

    #: Stop taking new jobs (do not exit): the first step of a graceful restart. For good:
    #: the worker exits once its jobs in hand are done.
    drain: Callable[[], None] | None = None
    #: Stop taking new jobs for now (jobs in hand go on): memory is over the soft limit.
    #: Called once per episode; cheap and idempotent where the framework allows.
    pause: Callable[[], None] | None = None
    #: Take new jobs again after :attr:`pause`: memory fell back under the soft limit
    #: (never after a drain: a restart under way is not undone).
    resume: Callable[[], None] | None = None
    #: Jobs running now, when the framework knows better than our own hook records.
    in_flight: Callable[[], list[dict[str, Any]]] | None = None
    #: Recycle one pool child; True if it will happen.
    recycle: Callable[[str], bool] | None = None
    #: Ask the processes that hold the memory (pool children) to reclaim too, beside our
    #: own; returns how many were asked. Their reclaims run while we go on watching.
    reclaim: Callable[[str], int] | None = None
    #: Asked before a graceful restart the policy wants, with the total in bytes: True
    #: when memory over the soft limit is held by a process that ends with its job (RQ's
    #: work horse); the restart then waits, intake stays paused.
    holds_elsewhere: Callable[[int], bool] | None = None
    #: Called with the jobs in flight just before a hard kill (poison counting, re-enqueue).
    #: It may return fields for the ``kill`` record: ``in_flight`` (the jobs that die when
    #: the kill takes less than the whole worker), ``target``, ``child_pid``.
    before_kill: Callable[[list[dict[str, Any]]], dict[str, Any] | None] | None = None
    #: The hard kill itself; default SIGKILL to our children, then ourselves. A kill that
    #: takes only a pool child calls :meth:`Warden.recovered`: we live on.
    kill: Callable[[], None] | None = None


@dataclass(frozen=True)
class WardenState:
    """What an integration may read of its warden, as of the last reading."""

    #: Soft and hard limits in bytes (``None``: not set), the grace and the caps.
    limits: Limits
    #: The memory quota in bytes, when known.
    quota: int | None
    #: The last reading (``None`` before the first).
    sample: Sample | None
    #: A drain overran the shutdown timeout: the kill takes the whole worker.
    overrun: bool
    #: A graceful restart is under way (or the framework is stopping us).
    restarting: bool
    #: Intake is paused by the warden.
    paused: bool
    #: A hard kill has been decided.
    killed: bool

    @property
    def total(self) -> int | None:
        """The last reading's total in bytes."""
        return None if self.sample is None else self.sample.total
