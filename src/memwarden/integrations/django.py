"""Django Tasks: ``"memwarden.django"`` in ``INSTALLED_APPS`` guards every ``db_worker``.

For the database backend of Django's tasks framework (``django.tasks`` on Django 6, the
``django-tasks`` backport with ``django-tasks-db`` on 5.2). Settings come from
``settings.MEMWARDEN`` (a dict of memwarden options, each also a ``MEMWARDEN_*`` env var).
The app swaps ``db_worker``'s ``Worker`` for :class:`GuardedWorker`, so the warden lives
only in worker processes, never in a web process that only enqueues.

- Records: the ``task_started`` / ``task_finished`` signals (task name, result id).
- Pause (over the soft limit) and drain both hold the worker's fetch, between two tasks; a
  task claimed by a fetch under way when intake stopped goes back to READY, unrun. The
  restart is the worker's own graceful stop (SIGTERM): it exits between tasks and its
  supervisor starts it again.
- A claimed task is a row in RUNNING, and nothing in ``db_worker`` ever brings back the
  row of a worker that died: the guard does. Just before its hard kill it puts the task
  in hand back to READY, its worker id marked ``(killed)`` in ``worker_ids``; a guarded
  worker (id ``mw:…``) holds a PostgreSQL advisory lock for its life, and every guarded
  worker sweeps, at start and every :data:`SWEEP_EVERY` seconds, the RUNNING rows of
  guarded workers whose lock is free (dead however they died: kernel OOM kill, crash),
  counting a kill against each. Elsewhere than PostgreSQL only a dead pid on this host
  tells.
- Poison: a task whose row was running at ``poison_kills`` kills is quarantined: FAILED,
  with :class:`Quarantined` as its error. The count lives in the row (``(killed)`` marks):
  it changes in the same transaction as the status, and needs no second store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.db import close_old_connections, connections, transaction

from memwarden.config import Config
from memwarden.gauges.proc import alive
from memwarden.integrations.shared import IntakeGuard
from memwarden.warden import Warden, kill_tree_and_self, swallow_but

log = logging.getLogger("memwarden")

__all__ = [
    "GuardedWorker",
    "MemwardenConfig",
    "Quarantined",
    "check_settings",
    "checks_from_env",
    "install",
]

#: db_worker has no control-flow exceptions of its own in its signal receivers (its stop
#: is SystemExit, which no hook boundary catches). Declared for the integration contract.
HOST_CONTROL_FLOW: tuple[type[BaseException], ...] = ()
_hook_guard = swallow_but(*HOST_CONTROL_FLOW)

#: How often a guarded worker sweeps for RUNNING rows of dead guarded workers (s).
SWEEP_EVERY = 5.0
#: How long the fetch waits between looks while intake is held (s).
IDLE = 0.1
#: How long a kill waits for a fetch under way (the worker's poll ``--interval`` counts in).
FETCH_WAIT = 2.0
#: How long a task that ends once a kill is decided waits for it before ending us itself.
KILL_WAIT = 30.0
#: A guarded worker's id starts with this; its advisory lock says it lives.
PREFIX = "mw:"
#: How a dead worker's id is marked in a row's ``worker_ids``: one mark, one kill.
KILLED = " (killed)"


class Quarantined(Exception):
    """The error a quarantined task's row carries: it was running at ``poison_kills``
    kills and is not run again (enqueue it anew once fixed)."""


def _db_worker() -> Any:
    from django_tasks_db.management.commands import db_worker

    return db_worker


def _models() -> tuple[Any, Any]:
    """The task row model and the statuses (``django.tasks``' on Django 6, the backport's)."""
    from django_tasks_db.compat import TaskResultStatus
    from django_tasks_db.models import DBTaskResult

    return DBTaskResult, TaskResultStatus


def _signals() -> tuple[Any, Any]:
    from django_tasks_db.compat import task_finished, task_started

    return task_started, task_finished


def lock_key(worker_id: str) -> int:
    """The advisory lock (a signed 64-bit key) of a guarded worker id."""
    digest = hashlib.blake2b(worker_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def kills_of(worker_ids: list[str]) -> int:
    """Kills a row has seen: its worker ids marked ``(killed)``."""
    return sum(1 for w in worker_ids if w.endswith(KILLED))


def guarded_id(worker_id: str) -> str:
    """The worker id of a guarded worker: its pid and host first (at most 64 characters)."""
    return f"{PREFIX}{os.getpid()}@{socket.gethostname()[:16]}:{worker_id}"[:64]


class Guard(IntakeGuard):
    """The warden of one ``db_worker`` process and what it needs from the worker."""

    def __init__(self, worker: Any, config: Config) -> None:
        self.worker = worker
        self.config = config
        self.model, self.status = _models()
        self.alias = self.model.objects.db
        self.killing = False
        self.in_hand: Any = None  # the DBTaskResult claimed, not ended
        self.started = False  # its run began (task_started)
        self.fetching = False  # the worker is between its hold and its next claimed task
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._life: Any = None  # the connection holding our advisory lock
        self.postgres = connections[self.alias].vendor == "postgresql"
        self.warden = Warden(config, hooks=self.hooks(), framework="django")

    # ------------------------------------------------------------ life
    def start(self) -> None:
        if self.postgres:
            self._life = connections.create_connection(self.alias)
            with self._life.cursor() as cur:
                cur.execute("SELECT pg_advisory_lock(%s)", [lock_key(self.worker.worker_id)])
        started, finished = _signals()
        started.connect(self.task_started, dispatch_uid="memwarden")
        finished.connect(self.task_finished, dispatch_uid="memwarden")
        self.sweep()
        threading.Thread(target=self._sweeping, name="memwarden-sweep", daemon=True).start()
        self.warden.start()
        log.info("memwarden: %r guarding db_worker %s", self.warden, self.worker.worker_id)

    def stop(self) -> None:
        self._stop.set()
        self.warden.stop()
        self.warden.close()
        if self._life is not None:
            self._life.close()

    def _sweeping(self) -> None:
        try:
            while not self._stop.wait(SWEEP_EVERY):
                self.sweep()
                connections[self.alias].close()
        finally:
            connections.close_all()

    # ------------------------------------------------------------ intake
    def held(self) -> bool:
        return self.paused or self.draining or self.killing

    def before_fetch(self) -> None:
        """Called by the worker's loop before each fetch: waits while intake is held."""
        self.fetching = False
        while self.held() and self.in_hand is None:
            if not self.worker.running:
                sys.exit(0)  # stopped while held: db_worker's own exit between tasks
            time.sleep(IDLE)
        self.fetching = self.in_hand is None

    def claimed(self, row: Any) -> bool:
        """A row the worker claimed: False (and back to READY) when intake stopped meanwhile."""
        try:
            with self._lock:
                if not self.held():
                    self.in_hand, self.started = row, False
                    return True
            self._put_back(row, killed=False, by="put_back")
            return False
        finally:
            self.fetching = False

    def ended(self) -> None:
        with self._lock:
            self.in_hand, self.started = None, False

    def settled(self, write: Callable[..., None], *args: Any) -> None:
        """The worker writes its task's outcome, unless a kill has judged the task already:
        then it waits for the kill (the row went back, it must not be overwritten). A task
        cut by ``db_worker``'s forced stop (a second SIGTERM/SIGINT) is not failed: its
        row goes back to READY."""
        with self._lock:
            if not self.killing:
                if not (args and isinstance(args[0], (SystemExit, KeyboardInterrupt))):
                    write(*args)
                    return
            else:
                args = ()
        if args:  # a second stop signal ended the task half-way (db_worker's "force")
            self._put_back(self.in_hand, killed=False, by="interrupted")
            return
        deadline = time.monotonic() + KILL_WAIT
        while time.monotonic() < deadline:
            time.sleep(0.05)
        kill_tree_and_self()

    @_hook_guard
    def task_started(self, sender: Any, task_result: Any, **_: Any) -> None:
        row = self.in_hand
        if row is None or str(row.id) != str(task_result.id):
            return
        self.started = True
        self.warden.job_started(row.task_path, str(task_result.id))

    @_hook_guard
    def task_finished(self, sender: Any, task_result: Any, **_: Any) -> None:
        row = self.in_hand
        if row is None or str(row.id) != str(task_result.id) or not self.started:
            return
        failed = str(task_result.status) == str(self.status.FAILED)
        self.warden.job_finished(str(task_result.id), **({"error": "failed"} if failed else {}))

    # ------------------------------------------------------------ the warden's hooks
    def drain(self) -> None:
        self.draining = True
        log.warning("memwarden: db_worker %s draining: no new tasks", self.worker.worker_id)

    def in_flight(self) -> list[dict[str, Any]]:
        row = self.in_hand
        return [] if row is None else [{"job": row.task_path, "job_id": str(row.id)}]

    def before_kill(self, in_flight: list[dict[str, Any]]) -> dict[str, Any]:
        """The task in hand back to READY (its run counted as a kill if it had begun), or
        quarantined at ``poison_kills``; from here on no task starts or ends."""
        with self._lock:
            self.killing = True
        # A fetch under way claims its task, sees the kill and puts it back, uncounted: wait
        # for it (at most FETCH_WAIT), lest the kill leave that row RUNNING and a sweep count
        # a kill against a task that never began.
        deadline = time.monotonic() + FETCH_WAIT
        while self.fetching and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            row, started = self.in_hand, self.started
        if row is None:
            return {"in_flight": []}
        self._put_back(row, killed=started, by="watchdog")
        return {"in_flight": [{"job": row.task_path, "job_id": str(row.id)}] if started else []}

    # ------------------------------------------------------------ rows
    def _put_back(self, row: Any, *, killed: bool, by: str) -> None:
        """Our claimed row back to READY (or quarantined), if still ours and RUNNING."""
        try:
            with transaction.atomic(using=self.alias):
                fresh = (
                    self.model.objects.select_for_update()
                    .filter(id=row.id, status=self.status.RUNNING)
                    .first()
                )
                mine = fresh is not None and fresh.worker_ids[-1:] == [self.worker.worker_id]
                if not mine:
                    return
                self._release(fresh, killed=killed, by=by)
        finally:
            if threading.current_thread() is not threading.main_thread():
                connections[self.alias].close()

    def _release(self, row: Any, *, killed: bool, by: str) -> None:
        """Inside a transaction holding ``row``'s lock: back to READY, or quarantined."""
        ids = list(row.worker_ids)
        if killed:
            ids[-1] = ids[-1] + KILLED
        elif by != "interrupted":
            ids.pop()  # taken and not run: as if never claimed
        kills = kills_of(ids)
        fields = {"job": row.task_path, "job_id": str(row.id), "framework": "django"}
        if killed and kills >= self.config.poison_kills:
            self._quarantine(row, ids, kills)
            return
        self.model.objects.filter(id=row.id).update(
            status=self.status.READY, worker_ids=ids, started_at=None
        )
        if not killed:
            self.warden.journal.write("put_back", **fields)
        else:
            self.warden.journal.write("requeue", by=by, kills=kills, **fields)
        log.warning("memwarden: task %s[%s] back to READY (%s)", row.task_path, row.id, by)

    def _quarantine(self, row: Any, ids: list[str], kills: int) -> None:
        reason = f"running at {kills} hard kills: quarantined, not retried"
        from django.utils import timezone

        self.model.objects.filter(id=row.id).update(
            status=self.status.FAILED,
            worker_ids=ids,
            finished_at=timezone.now(),
            exception_class_path=f"{Quarantined.__module__}.{Quarantined.__qualname__}",
            traceback=f"{Quarantined.__module__}.Quarantined: {reason}\n",
        )
        where = f"{self.model._meta.db_table} (status FAILED)"
        self.warden.quarantined(row.task_path, str(row.id), kills, where=where, reason=reason)

    @_hook_guard
    def sweep(self) -> None:
        """RUNNING rows of dead guarded workers back to READY (a kill counted), or
        quarantined at ``poison_kills``."""
        with transaction.atomic(using=self.alias):
            rows = (
                self.model.objects.select_for_update(skip_locked=True)
                .filter(status=self.status.RUNNING, backend_name=self.worker.backend_name)
                .order_by()
            )
            for row in rows:
                last = row.worker_ids[-1] if row.worker_ids else ""
                if last.startswith(PREFIX) and last != self.worker.worker_id and self._dead(last):
                    self._release(row, killed=True, by="rescue")

    def _dead(self, worker_id: str) -> bool:
        if self.postgres:
            key = lock_key(worker_id)
            with connections[self.alias].cursor() as cur:
                cur.execute("SELECT pg_try_advisory_xact_lock(%s)", [key])
                return bool(cur.fetchone()[0])
        pid, _, rest = worker_id[len(PREFIX) :].partition("@")
        host = rest.partition(":")[0]
        return host == socket.gethostname()[:16] and pid.isdigit() and not alive(int(pid))


def make_worker_class(base: type[Any]) -> type[Any]:
    """``db_worker``'s ``Worker`` with a guard."""

    class GuardedWorker(base):  # type: ignore[misc,valid-type,unused-ignore]
        """A ``db_worker`` worker kept inside its memory quota by memwarden."""

        guard: Guard | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.worker_id: str = guarded_id(kwargs["worker_id"])

        def run(self) -> None:
            _current["worker"] = self
            self.guard = guard = Guard(self, Config.from_env(**_options()))
            guard.start()
            try:
                super().run()
            finally:
                guard.stop()

        def run_task(self, db_task_result: Any) -> None:
            guard = self.guard
            if guard is None:
                return super().run_task(db_task_result)  # type: ignore[no-any-return]
            if not guard.claimed(db_task_result):
                return None
            for name in ("set_successful", "set_failed"):
                write = getattr(db_task_result, name)
                setattr(db_task_result, name, _settling(guard, write))
            try:
                super().run_task(db_task_result)
            finally:
                guard.ended()
            return None

    return GuardedWorker


def _settling(guard: Guard, write: Callable[..., None]) -> Callable[..., None]:
    def settled(*args: Any) -> None:
        guard.settled(write, *args)

    return settled


def _before_fetch() -> None:
    """In place of ``close_old_connections`` in ``db_worker``'s loop (called before each
    fetch): holds the fetch while intake is held."""
    close_old_connections()
    worker = _current.get("worker")
    if worker is not None and worker.guard is not None:
        worker.guard.before_fetch()


_current: dict[str, Any] = {}


def _options() -> dict[str, Any]:
    return dict(getattr(settings, "MEMWARDEN", {}) or {})


GuardedWorker: type[Any] | None = None


def install() -> None:
    """Swap ``db_worker``'s ``Worker`` for a guarded one (once; the app does it)."""
    global GuardedWorker
    module = _db_worker()
    if getattr(module.Worker, "guard", False) is not False:
        return
    Config.from_env(**_options())  # a bad setting fails at start, naming it
    module.Worker = GuardedWorker = make_worker_class(module.Worker)
    module.close_old_connections = _before_fetch


def check_settings() -> list[str]:
    """Settings under which a task can be lost (or come back late), one line each; also
    ``manage.py check``'s warnings (``memwarden.W001``…) and ``memwarden check``'s."""
    return [message for _, message in _problems()]


def _problems() -> list[tuple[str, str]]:
    from django.apps import apps

    out = []
    if not apps.is_installed("memwarden.django"):
        out.append(
            (
                "W001",
                "memwarden.django is not in INSTALLED_APPS: the row of a task whose db_worker "
                "is killed stays RUNNING for ever (nothing in db_worker brings it back)",
            )
        )
    model, _ = _models()
    if connections[model.objects.db].vendor != "postgresql":
        out.append(
            (
                "W002",
                "the tasks database is not PostgreSQL: the task of a worker that dies "
                "otherwise than by memwarden's kill comes back only through a guarded worker "
                "on the same host (no advisory locks to tell a dead worker elsewhere)",
            )
        )
    if getattr(settings, "DEBUG", False):
        out.append(
            (
                "W003",
                "DEBUG is on: db_worker runs under the autoreloader unless --no-reload, which "
                "does not start a worker again after memwarden's restart (run it with "
                "--no-reload under a supervisor)",
            )
        )
    config = Config.from_env(**_options())
    if config.restart == "none" and not config.dry_run:
        out.append(
            (
                "W004",
                "MEMWARDEN restart is none: a drained worker holds its fetch and never exits "
                "(nothing runs until someone restarts it)",
            )
        )
    return out


def system_checks(**_: Any) -> list[Any]:
    """``manage.py check``: memwarden's no-loss warnings."""
    from django.core import checks

    return [checks.Warning(message, id=f"memwarden.{code}") for code, message in _problems()]


def checks_from_env(config: Config, env: Mapping[str, str]) -> list[str]:
    """For ``memwarden check``: with ``DJANGO_SETTINGS_MODULE`` set (and Django Tasks'
    database backend installed), the project's no-loss warnings."""
    if not env.get("DJANGO_SETTINGS_MODULE"):
        return []
    import django

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as manage.py runs
    django.setup()
    return [f"django: JOBS CAN BE LOST: {message}" for message in check_settings()]


class MemwardenConfig(AppConfig):  # type: ignore[misc]
    """The ``memwarden.django`` app: guards ``db_worker`` (see the module)."""

    name = "memwarden.django"
    label = "memwarden"
    verbose_name = "memwarden"
    default = True

    def ready(self) -> None:
        from django.core import checks

        checks.register(system_checks, "memwarden")
        install()
