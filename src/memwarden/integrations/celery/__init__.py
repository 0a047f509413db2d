"""Celery: ``memwarden.celery.guard(app, **options)`` keeps a worker inside its quota.

Nothing happens in a process that only sends tasks: the wardens are built by the worker's
own signals.

- **Main process** (``worker_init``; watchdog from ``worker_ready``): the whole worker's
  figure (cgroup working set, else the PSS of its process tree). Over the soft limit:
  reclaim, then intake *pauses* (:class:`Intake`: the consumer stops fetching, and under
  threads/solo the tasks it holds but has not started go back to the broker; running ones
  go on) until memory is back under it; after the grace a *warm shutdown* (Celery stops
  consuming, lets the running tasks finish, closes its broker connection so what it holds
  goes back) and the restart action; for ``signal``/``exit`` the warm shutdown is the
  restart (the process exits, with ``exit_code`` for ``exit``, and its supervisor starts
  it again). At the hard limit (or on course to cross it before the next reading) a
  prefork worker loses only its largest pool child when that alone brings it under: that
  child's task is counted as a poison candidate and rejected back to the queue, billiard
  forks a new child, the worker serves on. Otherwise, and after the shutdown timeout: the
  tasks in flight are counted as poison candidates; under prefork the pool children are
  killed at once (their tasks are rejected back to the queue), a cold shutdown gets the
  broker connection closed, then SIGKILL. Where the task runs in the worker itself
  (threads, solo) every start and end of a task is frozen at the kill's instant, the tasks
  then running are the ones counted, the consumer takes nothing more, every message the
  worker holds goes back to its queue (Redis; RabbitMQ requeues them when the connection
  drops), then SIGKILL.
- **Prefork children** (``worker_process_init``): a ``job`` record per task from
  ``task_prerun``/``task_postrun``; after each task a child whose USS is over its share
  reclaims, then recycles by Celery's own ``worker_max_memory_per_child`` path — billiard's
  after-task memory check, answered with current USS instead of ``ru_maxrss`` (a peak
  that a freshly forked child inherits, so it would recycle after every task).
- **threads / solo pools**: tasks run in the main process, whose warden writes the
  records; a task has started at ``task_prerun`` and finished once Celery has stored its
  outcome (``task_success``/``task_failure``/``task_retry``, else ``task_postrun``).

A task redelivered after ``poison_kills`` hard kills is not run: it is marked FAILED with
:class:`PoisonJobError`, acknowledged, journaled (``quarantine``) and logged.

The package is split by process: :mod:`.worker` (the main process, with :mod:`.intake`,
its gate), :mod:`.child` (a prefork pool child), :mod:`.common` (what both use) and
:mod:`.wiring` (the signals that build each side).
"""

from memwarden.integrations.celery.child import UssGauge
from memwarden.integrations.celery.common import (
    HOST_CONTROL_FLOW,
    PoisonJobError,
    no_loss_problems,
    redis_visibility_note,
)
from memwarden.integrations.celery.wiring import CeleryGuard, check_app, guard
from memwarden.integrations.celery.worker import AfterWarmShutdown, default_child_share, pool_kind

__all__ = [
    "HOST_CONTROL_FLOW",
    "AfterWarmShutdown",
    "CeleryGuard",
    "PoisonJobError",
    "UssGauge",
    "check_app",
    "default_child_share",
    "guard",
    "no_loss_problems",
    "pool_kind",
    "redis_visibility_note",
]
