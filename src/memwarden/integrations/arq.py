"""arq: ``memwarden.arq.guard(WorkerSettings, **options)`` keeps an arq worker inside its quota.

The guard wraps the settings' ``on_startup``, ``on_job_start`` and ``after_job_end`` (the
user's own hooks still run, unchanged) and starts the warden with the worker.

- Records: one per job, named by the function (from the worker's own job table: the running
  ``run_job`` knows it; else the job's stored definition).
- Attribution with ``max_jobs > 1``: jobs share one process and one event loop, so a job's
  ``rss_before``/``rss_after`` is the process's, and its growth is shared with the jobs that
  ran beside it. Each record says how many did (``concurrent``, the most jobs in flight
  during its run); a job kind whose records grow even at ``concurrent == 1`` is the
  culprit. A hard kill counts against every job in flight.
- Pause (memory over the soft limit): the worker starts no job (its ``start_jobs`` is
  held, job by job), the running ones go on; it starts them again once memory is back
  under the limit. A job stays in arq's queue until it finishes, so one not started is
  simply left there.
- Drain: the worker stops picking jobs (``allow_pick_jobs``), the running ones finish within
  ``shutdown_timeout``, then the restart action (default SIGTERM: arq cancels what is left,
  and with ``retry_jobs`` those jobs stay queued and run again).
- Hard kill: arq keeps a job in its queue until it finishes, guarded by an in-progress key
  that would block it for ``job_timeout + 10 s`` after a kill. Just before the kill the guard
  cuts that key to :data:`PUT_BACK_DELAY` seconds, so the next worker runs the job at once;
  a job that was running at ``poison_kills`` kills is taken off the queue instead
  (quarantine list, a failed result naming the reason, a ``quarantine`` journal record).
  Only jobs running at the kill (started, and not yet recorded by arq as ended) count.
- A kill memwarden does not make (the kernel's OOM killer, a crash): every running job is
  noted with its worker in Redis (``memwarden:arq:{queue}:running``), and each worker keeps
  a lease; another worker frees the jobs of a dead one (counting the kill) at once when it
  ran on this host and its pid is gone, else when its lease has run out (:data:`LEASE`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Unpack, cast

import redis
from arq.connections import RedisSettings
from arq.constants import (
    default_queue_name,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import deserialize_job_raw, serialize_result
from arq.worker import JobExecutionFailed, Worker

from memwarden.config import Config, Options
from memwarden.gauges.proc import alive
from memwarden.integrations.shared import IntakeGuard, lease_loop
from memwarden.poison import PoisonJobs
from memwarden.warden import Warden, swallow_but

#: arq's control flow (asyncio's CancelledError) derives from BaseException: no hook
#: boundary catches it. Declared for the integration contract.
HOST_CONTROL_FLOW: tuple[type[BaseException], ...] = ()
_hook_guard = swallow_but(*HOST_CONTROL_FLOW)

log = logging.getLogger("memwarden")

__all__ = ["ArqGuard", "guard"]

#: After a kill, the in-progress key of a job put back lives this long: no job of the dying
#: worker can take it again, and the next worker runs it right after.
PUT_BACK_DELAY = 2.0

#: How long a quarantined job's failed result is kept when the worker keeps no results.
QUARANTINE_RESULT = 24 * 3600
#: A worker's lease on the jobs it runs (s), renewed every third of it.
LEASE = 10.0
#: How often a worker looks for jobs of dead workers (s).
RESCUE_EVERY = 5.0

#: HDEL field ARGV[1] of hash KEYS[1] if its value is still ARGV[2]: 1 if it was.
TAKE_IF_MINE_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


class ArqGuard(IntakeGuard):
    """The glue between one arq worker process and its warden."""

    def __init__(self, settings: Any, poison: PoisonJobs | None = None, **options: Any) -> None:
        self.settings = settings
        self.config = Config.from_env(**options)  # bad settings fail at import, clearly
        self.poison = poison
        self.warden: Warden | None = None
        self.worker: Worker | None = None
        self.redis: redis.Redis | None = None
        self.queue = str(_get(settings, "queue_name") or default_queue_name)
        self.quarantine_key = f"memwarden:arq:{self.queue}:quarantine"
        self._lock = threading.Lock()
        self._running: dict[str, dict[str, Any]] = {}  # job id -> name, try, most in flight
        #: This worker, as its running jobs are noted in Redis, and its lease.
        self.owner = ""
        self.running_key = f"memwarden:arq:{self.queue}:running"
        self._take_if: Any = None
        self._stop = threading.Event()

    # ------------------------------------------------------------ wiring
    def install(self) -> Any:
        user_startup = _get(self.settings, "on_startup")
        user_start = _get(self.settings, "on_job_start")
        user_end = _get(self.settings, "after_job_end")

        async def on_startup(ctx: dict[str, Any]) -> None:
            self.startup(asyncio.current_task())
            if user_startup is not None:
                await user_startup(ctx)

        async def on_job_start(ctx: dict[str, Any]) -> None:
            await self.job_start(ctx)
            if user_start is not None:
                await user_start(ctx)

        async def after_job_end(ctx: dict[str, Any]) -> None:
            running = self.job_ended(ctx)  # first: arq has recorded the job's end
            try:
                if user_end is not None:
                    await user_end(ctx)
            finally:
                await self.job_end(ctx, running)

        for name, hook in (
            ("on_startup", on_startup),
            ("on_job_start", on_job_start),
            ("after_job_end", after_job_end),
        ):
            _set(self.settings, name, hook)
        _set(self.settings, "memwarden_guard", self)  # not a Worker argument: arq ignores it
        return self.settings

    @_hook_guard
    def startup(self, main: asyncio.Task[Any] | None) -> None:
        """The worker is up: find it (its ``main()`` runs this hook), make the warden."""
        frame = main.get_coro().cr_frame if main is not None else None  # type: ignore[union-attr]
        worker = frame.f_locals.get("self") if frame is not None else None
        self.worker = worker if isinstance(worker, Worker) else None
        if self.worker is None:
            log.warning("memwarden: arq worker not found: drain falls back to the stop signal")
        else:
            self._hold_start_jobs(self.worker)
        self.redis = _sync_redis(_get(self.settings, "redis_settings"))
        if self.poison is None and self.redis is not None:
            self.poison = PoisonJobs(
                self.redis, kills=self.config.poison_kills, prefix=f"memwarden:arq:{self.queue}"
            )
        self.warden = Warden(self.config, hooks=self.hooks(), framework="arq").start()
        log.info("memwarden: guarding arq queue %s: %r", self.queue, self.warden)
        if self.redis is not None:
            self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
            self._take_if = self.redis.register_script(TAKE_IF_MINE_LUA)
            self._renew()
            self.rescue()
            threading.Thread(target=self._lease_loop, name="memwarden-lease", daemon=True).start()

    def _lease_key(self, owner: str) -> str:
        return f"memwarden:arq:{self.queue}:lease:{owner}"

    def _renew(self) -> None:
        assert self.redis is not None
        self.redis.set(self._lease_key(self.owner), 1, px=int(LEASE * 1000))

    def _lease_loop(self) -> None:
        lease_loop(
            self._stop, self._renew, self.rescue, lease=LEASE, rescue_every=RESCUE_EVERY, what="arq"
        )

    def _hold_start_jobs(self, worker: Worker) -> None:
        """Wrap the worker's ``start_jobs`` so that each job of a poll's batch starts only
        while intake is open: a pause or a drain that comes in the middle of a batch leaves
        the rest of it queued."""
        start_jobs = worker.start_jobs

        async def held_start_jobs(job_ids: list[bytes]) -> None:
            for job_id in job_ids:
                if self.paused or self.draining:
                    return
                await start_jobs([job_id])

        worker.start_jobs = held_start_jobs  # type: ignore[method-assign]

    # ------------------------------------------------------------ records
    async def job_start(self, ctx: dict[str, Any]) -> None:
        try:
            await self._job_start(ctx)
        except Exception:  # the hook boundary, as memwarden.warden.swallow
            log.exception("memwarden: internal error in job_start (job unaffected)")

    async def _job_start(self, ctx: dict[str, Any]) -> None:
        if self.warden is None:
            return
        job_id = str(ctx["job_id"])
        name = await self.function_name(ctx)
        with self._lock:
            n = len(self._running) + 1
            for other in self._running.values():
                other["concurrent"] = max(other["concurrent"], n)
            self._running[job_id] = {"job": name, "job_try": ctx.get("job_try"), "concurrent": n}
        if self.owner:
            await ctx["redis"].hset(self.running_key, job_id, self.owner)
        self.warden.job_started(name, job_id, job_try=ctx.get("job_try"), queue=self.queue)

    def job_ended(self, ctx: dict[str, Any]) -> dict[str, Any] | None:
        """arq has recorded the job's end: from here a kill does not count it (it is still
        in hand until the after-job hooks are done: a drain waits for them)."""
        with self._lock:
            running = self._running.get(str(ctx["job_id"]))
            if running is not None:
                running["ended"] = True
            return running

    async def job_end(self, ctx: dict[str, Any], running: dict[str, Any] | None) -> None:
        try:
            await self._job_end(ctx, running)
        except Exception:  # the hook boundary, as memwarden.warden.swallow
            log.exception("memwarden: internal error in job_end (job unaffected)")

    async def _job_end(self, ctx: dict[str, Any], running: dict[str, Any] | None) -> None:
        if self.warden is None:
            return
        job_id = str(ctx["job_id"])
        with self._lock:
            self._running.pop(job_id, None)
        if self.owner:
            # Not awaited: a stop that cancels this hook must not cut it (nor fail arq's
            # shutdown); a note left behind is cleared by the next look (the job has ended).
            note = ctx["redis"].eval(TAKE_IF_MINE_LUA, 1, self.running_key, job_id, self.owner)
            asyncio.ensure_future(note).add_done_callback(_quietly)
        concurrent = running["concurrent"] if running else 1
        self.warden.job_finished(job_id, concurrent=concurrent)

    async def function_name(self, ctx: dict[str, Any]) -> str:
        """From the worker's job table (the running ``run_job``), else the stored job."""
        task = asyncio.current_task()
        frame = task.get_coro().cr_frame if task is not None else None  # type: ignore[union-attr]
        name = frame.f_locals.get("function_name") if frame is not None else None
        if isinstance(name, str) and name != "<unknown>":
            return name
        raw = await ctx["redis"].get(job_key_prefix + str(ctx["job_id"]))
        if raw:
            deserializer = self.worker.job_deserializer if self.worker is not None else None
            return str(deserialize_job_raw(raw, deserializer=deserializer)[0])
        return "<unknown>"

    # ------------------------------------------------------------ the warden's hooks
    def drain(self) -> None:
        self.draining = True
        if self.worker is not None:
            self.worker.allow_pick_jobs = False
            log.warning("memwarden: arq worker %d draining: no new jobs", os.getpid())

    def in_flight(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"job": v["job"], "job_id": k} for k, v in self._running.items()]

    def before_kill(self, in_flight: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Just before the hard kill: every job running free to run again at once, or
        quarantined if it was running at ``poison_kills`` kills. Only jobs running at this
        instant count (and make the kill record's ``in_flight``): started, and still in
        arq's queue (arq takes a job off it as it records the job's end)."""
        self.drain()
        if self.redis is None:
            return None
        with self._lock:
            started = {
                job_id: str(v["job"]) for job_id, v in self._running.items() if not v.get("ended")
            }
        counted = []
        for job_id, name in started.items():
            if self.redis.zscore(self.queue, job_id) is None:
                continue  # ended before the kill: arq has recorded it
            counted.append({"job": name, "job_id": job_id})
            self._free(job_id, name, by="watchdog")
        # Taken by the worker but not started yet: free them too, no kill counted.
        for job_id in list(self.worker.tasks) if self.worker is not None else []:
            if job_id not in started:
                self.redis.pexpire(in_progress_key_prefix + job_id, int(PUT_BACK_DELAY * 1000))
        return {"in_flight": counted}

    def _free(self, job_id: str, name: str, by: str) -> None:
        """A job cut by a kill: one kill counted; run again at once, or quarantined."""
        assert self.redis is not None
        kills = self.poison.record_kill(job_id) if self.poison is not None else 0
        if self.owner and by == "watchdog":
            self._take_if(keys=[self.running_key], args=[job_id, self.owner])
        if self.poison is not None and kills >= self.poison.kills:
            self.quarantine(job_id, name, kills)
            return
        self.redis.pexpire(in_progress_key_prefix + job_id, int(PUT_BACK_DELAY * 1000))
        if self.warden is not None and by != "watchdog":
            self.warden.journal.write(
                "requeue", by=by, job=name, job_id=job_id, kills=kills, framework="arq"
            )
        log.warning("memwarden: arq job %s[%s] will run again (%d kills)", name, job_id, kills)

    @_hook_guard
    def rescue(self) -> None:
        """Jobs noted as running by a worker that is gone (its lease ran out, or it ran on
        this host and its pid is no more): each counts one kill and runs again at once, or
        is quarantined at ``poison_kills``. A job no longer in the queue had ended."""
        assert self.redis is not None
        verdicts: dict[str, bool] = {}
        running = cast("dict[bytes, bytes]", self.redis.hgetall(self.running_key))
        for raw_id, raw_owner in running.items():
            job_id, owner = raw_id.decode(), raw_owner.decode()
            if owner == self.owner:
                continue
            if owner not in verdicts:
                verdicts[owner] = self._dead(owner)
            if not verdicts[owner] or not self._take_if(
                keys=[self.running_key], args=[job_id, owner]
            ):
                continue
            if self.redis.zscore(self.queue, job_id) is not None:
                self._free(job_id, self._stored_name(job_id), by="rescue")

    def _dead(self, owner: str) -> bool:
        assert self.redis is not None
        if not self.redis.exists(self._lease_key(owner)):
            return True
        host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        return host == socket.gethostname() and pid.isdigit() and not alive(int(pid))

    def _stored_name(self, job_id: str) -> str:
        assert self.redis is not None
        raw = cast("bytes | None", self.redis.get(job_key_prefix + job_id))
        if not raw:
            return "<unknown>"
        deserializer = self.worker.job_deserializer if self.worker is not None else None
        return str(deserialize_job_raw(raw, deserializer=deserializer)[0])

    def quarantine(self, job_id: str, name: str, kills: int) -> None:
        """Off the queue for good: the job's definition to the quarantine list, a failed
        result naming the reason (``await job.result()`` raises it)."""
        assert self.redis is not None
        reason = f"running at {kills} hard kills: quarantined by memwarden, not retried"
        raw = cast("bytes | None", self.redis.get(job_key_prefix + job_id))
        now = int(time.time() * 1000)
        result = serialize_result(
            name,
            (),
            {},
            kills,
            now,
            False,
            JobExecutionFailed(reason),
            now,
            now,
            f"{job_id}:{name}",
            self.queue,
            job_id,
            serializer=self.worker.job_serializer if self.worker is not None else None,
        )
        pipe = self.redis.pipeline()
        pipe.zrem(self.queue, job_id)
        if raw:
            pipe.rpush(self.quarantine_key, raw)
        if result is not None:
            keep = self.worker.keep_result_s if self.worker is not None else 0
            pipe.set(result_key_prefix + job_id, result, px=int((keep or QUARANTINE_RESULT) * 1000))
        pipe.delete(job_key_prefix + job_id, retry_key_prefix + job_id)
        pipe.delete(in_progress_key_prefix + job_id)
        pipe.execute()
        if self.warden is not None:
            self.warden.quarantined(name, job_id, kills, where=self.quarantine_key, reason=reason)


def _quietly(done: asyncio.Future[Any]) -> None:
    """Done callback of a fire-and-forget Redis call: its error is logged, never raised."""
    if not done.cancelled() and done.exception() is not None:
        log.warning("memwarden: arq bookkeeping failed: %s", done.exception())


def _get(settings: Any, name: str) -> Any:
    if isinstance(settings, dict):
        return settings.get(name)
    return settings.__dict__.get(name)  # arq reads the class's own __dict__ too


def _set(settings: Any, name: str, value: Any) -> None:
    if isinstance(settings, dict):
        settings[name] = value
    else:
        setattr(settings, name, value)


def _sync_redis(settings: RedisSettings | None) -> redis.Redis | None:
    """A plain client for the watchdog thread (the worker's own pool is asyncio-bound)."""
    s = settings or RedisSettings()
    if s.sentinel or not isinstance(s.host, str):
        log.warning("memwarden: arq on Redis Sentinel: no put-back or poison counting")
        return None
    return redis.Redis(
        host=s.host,
        port=s.port,
        db=s.database,
        username=s.username,
        password=s.password,
        ssl=s.ssl,
        unix_socket_path=s.unix_socket_path,
        socket_timeout=5,
    )


def guard(settings: Any, *, poison: PoisonJobs | None = None, **options: Unpack[Options]) -> Any:
    """Guard the worker run from ``settings`` (a ``WorkerSettings`` class or dict); returns
    it. ``options`` are memwarden settings (``soft_limit="400MB"``, …), each also a
    ``MEMWARDEN_*`` env var; ``poison`` defaults to counting kills in the worker's Redis."""
    return ArqGuard(settings, poison, **options).install()
