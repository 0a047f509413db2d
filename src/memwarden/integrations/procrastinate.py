"""Procrastinate: ``memwarden.procrastinate.guard(app, **options)`` keeps its workers in quota.

The guard adds a worker middleware (Procrastinate's own hook around every job) and wraps
the app's worker factory and job manager; the warden starts with each worker.

- Records: one per job, named by the task (``job``), with Procrastinate's job id. Jobs of
  one worker share its process and event loop: a record's growth is shared with the jobs
  beside it; ``concurrent`` says how many ran (as arq's).
- Pause (memory over the soft limit): the worker's fetch loop gets no job (the job
  manager's ``fetch_job`` answers "none" while paused); the jobs running go on; on resume
  the worker is woken to fetch at once. A job not fetched stays ``todo`` in PostgreSQL.
- Drain: ``worker.stop()`` (Procrastinate's graceful shutdown: no new job, the running
  ones finish), then the restart action (default SIGTERM). Keep the worker's
  ``shutdown_graceful_timeout`` unset (or longer than ``shutdown_timeout``): a job aborted
  by it is lost unless its task retries.
- Hard kill: just before it, every job running (``doing``, on this worker) counts one kill
  and is set back to ``todo`` at once (``procrastinate_retry_job_v2``), or, at
  ``poison_kills`` kills, is quarantined: status ``failed`` and a row in
  :data:`KILLS_TABLE` naming the reason (a ``quarantine`` journal record).
- A kill memwarden does not make (the kernel's OOM killer, a crash): Procrastinate itself
  leaves such a job ``doing`` for good. Each guarded worker looks, every
  :data:`RESCUE_EVERY` seconds, for jobs ``doing`` on a worker whose heartbeat is older
  than its ``stalled_worker_timeout`` (or that is gone), and frees them the same way: back
  within ``stalled_worker_timeout + RESCUE_EVERY`` seconds.

Poison counts live in PostgreSQL, not Redis: a Procrastinate deployment has PostgreSQL and
may have no Redis, and the count, the retry and the quarantine of a job are one
transaction with its row locked, so two workers that find the same dead job count it once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Unpack

import psycopg
from procrastinate import App, JobContext
from procrastinate.worker import Worker

from memwarden.config import Config, Options
from memwarden.integrations.shared import IntakeGuard
from memwarden.warden import Warden, swallow_but

#: Procrastinate's control flow (asyncio's CancelledError) derives from BaseException: no
#: hook boundary catches it. Declared for the integration contract.
HOST_CONTROL_FLOW: tuple[type[BaseException], ...] = ()
_hook_guard = swallow_but(*HOST_CONTROL_FLOW)

log = logging.getLogger("memwarden")

__all__ = ["KILLS_TABLE", "ProcrastinateGuard", "check_app", "guard", "no_loss_problems"]

#: Kill counts and quarantines, beside Procrastinate's tables (a row goes with its job).
KILLS_TABLE = "memwarden_procrastinate_kills"
#: How often a worker looks for jobs left ``doing`` by a dead worker (s).
RESCUE_EVERY = 5.0
#: The longest a statement of ours may take (s): a kill is held back no longer per job.
STATEMENT_TIMEOUT = 5.0

CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {KILLS_TABLE} (
    job_id bigint PRIMARY KEY REFERENCES procrastinate_jobs(id) ON DELETE CASCADE,
    kills integer NOT NULL DEFAULT 0,
    quarantined_at timestamptz,
    reason text
)"""
#: Jobs ``doing`` on a worker other than ours whose heartbeat is old, or that is gone.
ORPHANS = """
SELECT j.id, j.task_name FROM procrastinate_jobs j
  LEFT JOIN procrastinate_workers w ON w.id = j.worker_id
 WHERE j.status = 'doing' AND j.worker_id IS DISTINCT FROM %(me)s
   AND (w.id IS NULL OR w.last_heartbeat < now() - make_interval(secs => %(stalled)s))
"""


class ProcrastinateGuard(IntakeGuard):
    """The glue between one Procrastinate worker process and its warden."""

    def __init__(self, app: App, dsn: str | None = None, **options: Any) -> None:
        self.app = app
        self.config = Config.from_env(**options)  # bad settings fail at import, clearly
        self.dsn = dsn
        self.warden: Warden | None = None
        self.worker: Worker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._running: dict[int, dict[str, Any]] = {}  # job id -> task name, most in flight
        self._stop = threading.Event()
        self._db_lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None

    # ------------------------------------------------------------ wiring
    def install(self) -> App:
        defaults: dict[str, Any] = dict(self.app.worker_defaults)
        defaults["worker_middleware"] = [self.middleware, *defaults.get("worker_middleware", [])]
        self.app.worker_defaults = defaults  # type: ignore[assignment]
        make_worker = self.app._worker

        def _worker(**kwargs: Any) -> Worker:
            worker = make_worker(**kwargs)
            self.watch(worker)
            return worker

        self.app._worker = _worker  # type: ignore[method-assign]
        fetch_job = self.app.job_manager.fetch_job

        async def held_fetch_job(*args: Any, **kwargs: Any) -> Any:
            if self.paused or self.draining:
                return None  # the job stays todo; resume wakes the fetch loop
            return await fetch_job(*args, **kwargs)

        self.app.job_manager.fetch_job = held_fetch_job  # type: ignore[method-assign]
        self.app.memwarden_guard = self  # type: ignore[attr-defined]
        return self.app

    def watch(self, worker: Worker) -> None:
        """A worker is made: start the warden with its run, stop it after."""
        self.worker = worker
        run: Callable[[], Awaitable[None]] = worker.run
        stop: Callable[[], None] = worker.stop

        def stopped() -> None:
            if not self.draining and self.warden is not None:
                self.warden.being_stopped()  # Procrastinate's own stop (a signal)
            stop()

        async def guarded_run() -> None:
            self.loop = asyncio.get_running_loop()
            self.startup()
            try:
                await run()
            finally:
                self._stop.set()
                if self.warden is not None:
                    self.warden.stop()
                with self._db_lock, contextlib.suppress(Exception):
                    if self._conn is not None:
                        self._conn.close()

        worker.stop = stopped  # type: ignore[method-assign]
        worker.run = guarded_run  # type: ignore[method-assign]

    @_hook_guard
    def startup(self) -> None:
        with self.connect() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (KILLS_TABLE,))
            conn.execute(CREATE_TABLE)
        self.warden = Warden(self.config, hooks=self.hooks(), framework="procrastinate").start()
        log.info("memwarden: guarding a procrastinate worker: %r", self.warden)
        for problem in no_loss_problems(self.app, _settings(self.worker)):
            log.warning("memwarden: procrastinate: JOBS CAN BE LOST: %s", problem)
        with contextlib.suppress(Exception), self.connection():
            pass  # open now: the first kill does not wait for it
        threading.Thread(target=self._rescue_loop, name="memwarden-rescue", daemon=True).start()

    def connect(self) -> psycopg.Connection[Any]:
        """A connection of our own (the app's pool belongs to its event loop); a statement
        never holds a hard kill back more than :data:`STATEMENT_TIMEOUT` seconds."""
        args: Mapping[str, Any] = getattr(self.app.connector, "_pool_args", {}) or {}
        conninfo = self.dsn if self.dsn is not None else str(args.get("conninfo", ""))
        kwargs = {} if self.dsn is not None else dict(args.get("kwargs") or {})
        kwargs["options"] = f"-c statement_timeout={int(STATEMENT_TIMEOUT * 1000)}"
        kwargs.setdefault("connect_timeout", 5)
        return psycopg.connect(conninfo, **kwargs)

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """This worker's connection, kept open (a kill does not wait for a new one), made
        again after a failure; one user at a time (the watchdog, the rescue thread)."""
        with self._db_lock:
            if self._conn is None or self._conn.closed:
                self._conn = self.connect()
            try:
                yield self._conn
            except BaseException:
                with contextlib.suppress(Exception):
                    self._conn.close()
                self._conn = None
                raise

    # ------------------------------------------------------------ records
    async def middleware(
        self, call_next: Callable[[], Awaitable[Any]], context: JobContext, worker: Worker
    ) -> Any:
        """Procrastinate's worker middleware: one record per job."""
        job = context.job
        self.job_started(job.id, job.task_name, job.queue)
        try:
            return await call_next()
        finally:
            self.job_finished(job.id)

    @_hook_guard
    def job_started(self, job_id: int | None, name: str, queue: str) -> None:
        if self.warden is None or job_id is None:
            return
        with self._lock:
            n = len(self._running) + 1
            for other in self._running.values():
                other["concurrent"] = max(other["concurrent"], n)
            self._running[job_id] = {"job": name, "concurrent": n}
        self.warden.job_started(name, str(job_id), queue=queue)

    @_hook_guard
    def job_finished(self, job_id: int | None) -> None:
        if self.warden is None or job_id is None:
            return
        with self._lock:
            running = self._running.pop(job_id, None)
        concurrent = running["concurrent"] if running else 1
        self.warden.job_finished(str(job_id), concurrent=concurrent)

    # ------------------------------------------------------------ the warden's hooks
    def resume(self) -> None:
        super().resume()
        self._wake()

    def _wake(self) -> None:
        worker, loop = self.worker, self.loop
        if worker is not None and loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(worker._new_job_event.set)

    def drain(self) -> None:
        self.draining = True
        if self.worker is not None:
            self.worker.stop()  # type: ignore[no-untyped-call]
            log.warning("memwarden: procrastinate worker %d draining: no new jobs", os.getpid())

    def in_flight(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"job": v["job"], "job_id": str(k)} for k, v in self._running.items()]

    def before_kill(self, in_flight: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Just before the hard kill: each job running here counts one kill and is set
        back to ``todo``, or quarantined at ``poison_kills``."""
        self.draining = True
        with self._lock:
            running = {k: str(v["job"]) for k, v in self._running.items()}
        me = self.worker.worker_id if self.worker is not None else None
        counted = []
        with self.connection() as conn:
            for job_id, name in running.items():
                if self._free(conn, job_id, name, me, by="watchdog"):
                    counted.append({"job": name, "job_id": str(job_id)})
        return {"in_flight": counted}

    def _free(
        self, conn: psycopg.Connection[Any], job_id: int, name: str, worker: int | None, by: str
    ) -> bool:
        """One job cut by a kill, in one transaction with its row locked: if it is still
        ``doing`` on ``worker`` (None: on no live one), count the kill and retry it now, or
        quarantine it. True if it was."""
        with conn.transaction():
            row = conn.execute(
                "SELECT status, worker_id FROM procrastinate_jobs WHERE id = %s FOR UPDATE",
                (job_id,),
            ).fetchone()
            if row is None or row[0] != "doing" or (worker is not None and row[1] != worker):
                return False
            kills = _count_kill(conn, job_id)
            poison = kills >= self.config.poison_kills
            if poison:
                reason = f"running at {kills} hard kills: quarantined by memwarden, not retried"
                conn.execute(
                    f"UPDATE {KILLS_TABLE} SET quarantined_at = now(), reason = %s"
                    " WHERE job_id = %s",
                    (reason, job_id),
                )
                conn.execute(
                    "SELECT procrastinate_finish_job_v1(%s::bigint, 'failed', false)", (job_id,)
                )
            else:
                conn.execute(
                    "SELECT procrastinate_retry_job_v2(%s::bigint, now(), NULL, NULL, NULL)",
                    (job_id,),
                )
        self._said(job_id, name, kills, by, reason if poison else None)
        return True

    def _said(self, job_id: int, name: str, kills: int, by: str, reason: str | None) -> None:
        if self.warden is None:
            return
        if reason is not None:
            self.warden.quarantined(name, str(job_id), kills, where=KILLS_TABLE, reason=reason)
            return
        if by != "watchdog":  # the kill record names the watchdog's own
            self.warden.journal.write(
                "requeue", by=by, job=name, job_id=str(job_id), kills=kills,
                framework="procrastinate",
            )  # fmt: skip
        log.warning(
            "memwarden: procrastinate job %s[%s] back to todo (%d kills)", name, job_id, kills
        )

    # ------------------------------------------------------------ jobs of dead workers
    def _rescue_loop(self) -> None:
        while not self._stop.wait(RESCUE_EVERY):
            try:
                self.rescue()
            except Exception:
                log.exception("memwarden: procrastinate rescue failed (retried)")

    def rescue(self) -> int:
        """Jobs ``doing`` on a worker whose heartbeat is older than its stalled timeout
        (or that is gone): each counts one kill and runs again now, or is quarantined."""
        worker = self.worker
        me = worker.worker_id if worker is not None else None
        stalled = worker.stalled_worker_timeout if worker is not None else 30.0
        freed = 0
        with self.connection() as conn:
            rows = conn.execute(ORPHANS, {"me": me, "stalled": stalled}).fetchall()
            conn.commit()
            for job_id, name in rows:
                if self._orphan_still(conn, job_id, me, stalled):
                    freed += self._free(conn, job_id, name, None, by="rescue")
        return freed

    def _orphan_still(
        self, conn: psycopg.Connection[Any], job_id: int, me: int | None, stalled: float
    ) -> bool:
        row = conn.execute(
            ORPHANS + " AND j.id = %(id)s", {"me": me, "stalled": stalled, "id": job_id}
        ).fetchone()
        conn.commit()
        return row is not None


def _settings(worker: Worker | None) -> dict[str, Any] | None:
    """A running worker's settings that :func:`no_loss_problems` reads."""
    if worker is None:
        return None
    names = ("shutdown_graceful_timeout", "update_heartbeat_interval", "stalled_worker_timeout")
    return {n: getattr(worker, n) for n in names}


def _count_kill(conn: psycopg.Connection[Any], job_id: int) -> int:
    row = conn.execute(
        f"INSERT INTO {KILLS_TABLE} (job_id, kills) VALUES (%s, 1)"
        f" ON CONFLICT (job_id) DO UPDATE SET kills = {KILLS_TABLE}.kills + 1 RETURNING kills",
        (job_id,),
    ).fetchone()
    return int(row[0]) if row else 1


# ------------------------------------------------------------------ memwarden check
def no_loss_problems(app: App, settings: Mapping[str, Any] | None = None) -> list[str]:
    """Settings of ``app`` under which a job can be lost (or left for good): its worker
    settings, ``settings`` (a running worker's) else the app's ``worker_defaults``."""
    app.perform_import_paths()  # type: ignore[no-untyped-call]
    out = []
    defaults: Mapping[str, Any] = (app.worker_defaults or {}) if settings is None else settings
    if getattr(app, "memwarden_guard", None) is None:
        out.append(
            "the app is not guarded (memwarden.procrastinate.guard(app)): Procrastinate "
            "leaves a job whose worker was killed 'doing' for good"
        )
    if defaults.get("shutdown_graceful_timeout") is not None:
        unsafe = sorted(
            {
                t.name
                for t in app.tasks.values()
                if t.retry_strategy is None and "procrastinate.builtin_tasks" not in t.name
            }
        )
        if unsafe:
            out.append(
                "shutdown_graceful_timeout is set: a job still running then is aborted, and "
                f"these tasks do not retry, so it is lost: {', '.join(unsafe)}"
            )
    beat = float(defaults.get("update_heartbeat_interval", 10.0))
    stalled = float(defaults.get("stalled_worker_timeout", 30.0))
    if beat >= stalled:
        out.append(
            f"update_heartbeat_interval ({beat:g}s) >= stalled_worker_timeout ({stalled:g}s): "
            "a live worker looks dead and its jobs run twice"
        )
    return out


def check_app(spec: str) -> Callable[[Config, Mapping[str, str]], list[str]]:
    """A ``memwarden check`` extra for ``--procrastinate-app module.app``."""
    import sys

    from procrastinate import utils

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as ``procrastinate --app`` does
    app = utils.load_from_path(spec, App)

    def procrastinate_checks(config: Config, env: Mapping[str, str]) -> list[str]:
        return [f"procrastinate: JOBS CAN BE LOST: {p}" for p in no_loss_problems(app)]

    return procrastinate_checks


def guard(app: App, *, dsn: str | None = None, **options: Unpack[Options]) -> App:
    """Guard every worker run from ``app`` (``procrastinate --app=… worker``); returns it.
    ``options`` are memwarden settings (``soft_limit="400MB"``, …), each also a
    ``MEMWARDEN_*`` env var; ``dsn`` is for memwarden's own connection (default: the
    app's connector's ``conninfo``)."""
    return ProcrastinateGuard(app, dsn, **options).install()
