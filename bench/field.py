"""The field matrix (issue 13): every worker × every workload, default memwarden settings,
each cell in a fresh real memory cgroup with the kernel's OOM killer as the judge.

A cell is ``framework/workload``. The bench is the platform: it starts the worker in the
cell's cgroup and starts it again whenever it exits (any status, at once), as a dyno
manager or kubelet would. memwarden gets only the cgroup's limit (its defaults: soft 85%,
hard 95%, grace 120 s, min uptime 30 s, ...), a journal path and a private state dir.
Frameworks get the settings their docs/ pages ask for so that no job is lost, their defaults
otherwise.

Workers (``--list`` shows the cells): Celery prefork (-c 2), threads (-c 4) and solo; RQ
``Worker`` and ``SimpleWorker``; Dramatiq (2 processes × 2 threads); Huey process (-w 2)
and thread (-w 4) workers; arq (``max_jobs = 4``); Taskiq (2 processes × 2 async tasks,
RedisStreamBroker); Django Tasks' ``db_worker`` (its
database backend on PostgreSQL, a database per cell); Procrastinate (4 async jobs, a
PostgreSQL database per cell); ``memwarden run`` around a plain Python
worker with a SIGTERM handler (2 threads); Sidekiq through ``run`` when its app and
Debian's ``ruby-sidekiq`` are here.

Workloads: ``slow-leak`` (~1 MiB/s, small objects), ``fast-leak`` (jobs keeping 2–8 MiB
each, ≥ 50 MiB/s), ``big-leak`` (256 KiB objects, mmap'd), ``fragment`` (glibc
stair-step), ``spike`` (a big job now and then that lets go), ``poison`` (one job in a normal
batch grows without end) and ``runaway`` (a job allocating 1 GiB/s, ``--tries`` times: who
stops it first, memwarden or the kernel?).

Each cell's quota: the idle worker's working set (measured first, per framework, in a big
cgroup) plus the workload's headroom, over 0.85 — so the default soft limit sits that
headroom above the idle worker.

Measured per cell, from Redis (every run and completion of every job id) and the journal:
lost ids, duplicate completions, the cgroup's OOM kills, remedies (graceful: a worker's
restart record followed by a clean exit, or a pool child recycled after its job; hard: a
memwarden kill, or a restart cut short by a SIGKILL from elsewhere), the poison job
quarantined after at most 3 kills, jobs other than the poison one counted towards
poison. Goal per cell: 0 lost, 0 OOM kills, 0 innocents counted, the poison job
quarantined, ≥ 90% of remedies graceful outside the poison cell (runaway: the kernel never
first).

Usage::

    python bench/field.py                        # the whole matrix (~25 min on 2 busy cores)
    python bench/field.py --cells 'celery-*/fast-leak,run/*' --rounds 2
    python bench/field.py --tiny                 # a few small cells, for the tests
    python bench/field.py --out docs --readme README.md    # docs/field.md, README block

Prints one line per cell, last:
``cell=<framework>/<workload> jobs=… lost=… dup=… oom_kills=… graceful=… kills=… poison_ok=…
verdict=…`` (and more ``key=value``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fnmatch
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis

from _harness import (
    APPS,
    BenchCgroup,
    Result,
    Sampler,
    bench_env,
    dyno,
    machine,
    parse_lines,
    replace_block,
    table,
    write_text,
)
from memwarden.journal import read_records
from memwarden.units import format_size

MB = 1024 * 1024
REDIS = "redis://127.0.0.1:6379/11"  # this bench's own Redis DB
BIN = os.path.dirname(sys.executable)
#: memwarden's default limits (share of a cgroup quota) and poison kills.
SOFT_SHARE, HARD_SHARE, POISON_KILLS = 0.85, 0.95, 3
GRACEFUL_GOAL = 0.9


# ------------------------------------------------------------------------ the matrix
@dataclass(frozen=True)
class Framework:
    name: str
    family: str  # celery, rq, dramatiq, huey, arq, taskiq, django, procrastinate, run, sidekiq
    concurrency: int
    argv: tuple[str, ...]
    #: Delivery the framework promises: with "exactly once" a duplicate fails the cell. None
    #: of these does (a job cut by a kill runs again): duplicates are counted, not judged.
    delivery: str = "at least once"


def _argv(program: str, args: str) -> tuple[str, ...]:
    return (program, *args.split())


def _celery(pool: str, c: int) -> tuple[str, ...]:
    return _argv(
        sys.executable,
        f"-m celery -A field_celery worker -P {pool} -c {c} --loglevel INFO "
        "--without-gossip --without-mingle",
    )


RUN_PY = os.path.join(APPS, "field_run.py")
SIDEKIQ_RB = os.path.join(APPS, "field_sidekiq.rb")
FRAMEWORKS = {
    f.name: f
    for f in (
        Framework("celery-prefork", "celery", 2, _celery("prefork", 2)),
        Framework("celery-threads", "celery", 4, _celery("threads", 4)),
        Framework("celery-solo", "celery", 1, _celery("solo", 1)),
        Framework("rq-worker", "rq", 1, _argv(f"{BIN}/rq", "worker -w memwarden.rq.Worker")),
        Framework("rq-simple", "rq", 1, _argv(f"{BIN}/rq", "worker -w memwarden.rq.SimpleWorker")),
        Framework(
            "dramatiq",
            "dramatiq",
            4,
            _argv(
                f"{BIN}/dramatiq",
                "field_dramatiq --processes 2 --threads 2 --worker-shutdown-timeout 25000",
            ),
        ),
        Framework(
            "huey-process",
            "huey",
            2,
            _argv(f"{BIN}/huey_consumer", "field_huey.huey -k process -w 2 -c 1 -g TERM -t 25"),
        ),
        Framework(
            "huey-thread",
            "huey",
            4,
            _argv(f"{BIN}/huey_consumer", "field_huey.huey -k thread -w 4 -g TERM -t 25"),
        ),
        Framework("arq", "arq", 4, _argv(f"{BIN}/arq", "field_arq.WorkerSettings")),
        Framework(
            "taskiq",
            "taskiq",
            4,
            _argv(f"{BIN}/taskiq", "worker field_taskiq:broker --workers 2 --max-async-tasks 2"),
        ),
        Framework("django-tasks", "django", 1, _argv(sys.executable, "-m django db_worker")),
        Framework(
            "procrastinate",
            "procrastinate",
            4,
            _argv(f"{BIN}/procrastinate", "--app=field_procrastinate.app worker"),
        ),
        Framework(
            "run",
            "run",
            2,
            (sys.executable, "-m", "memwarden.cli", "run", "--", sys.executable, RUN_PY),
        ),
        Framework(
            "sidekiq-run",
            "sidekiq",
            5,
            _argv(sys.executable, "-m memwarden.cli run --drain-signal TSTP -- sidekiq -r")
            + _argv(SIDEKIQ_RB, "-c 5 -t 20"),
        ),
    )
}


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    #: MiB between the idle worker and the soft limit, from the idle worker's MiB.
    headroom: Callable[[float], float] = lambda idle: 240.0


WORKLOADS = {
    w.name: w
    for w in (
        # The headroom keeps the idle worker under 80% of its soft limit: a restart that
        # brings it back there is a cure, not a loop (memwarden's LOOP_SHARE).
        Workload("slow-leak", "slow leak", lambda idle: max(16.0, 0.3 * idle)),
        Workload("fast-leak", "fast leak"),
        Workload("big-leak", "big buffers"),
        Workload("fragment", "fragmentation"),
        Workload("spike", "spike"),
        Workload("poison", "poison job"),
        Workload("runaway", "runaway"),
    )
}
MATRIX_WORKLOADS = ("slow-leak", "fast-leak", "big-leak", "fragment", "spike", "poison")
#: The runaway cell(s) of the default matrix (any framework can run one with --cells).
RUNAWAY_CELLS = ("run/runaway",)
TINY_CELLS = ("celery-prefork/fragment", "rq-worker/poison", "run/fast-leak", "run/runaway")


def all_cells() -> list[str]:
    cells = [f"{f}/{w}" for f in FRAMEWORKS for w in MATRIX_WORKLOADS]
    return cells + list(RUNAWAY_CELLS)


def why_not(framework: str) -> str | None:
    """None when the framework's cells can run here, else why not."""
    if framework != "sidekiq-run":
        return None
    if shutil.which("sidekiq") is None:
        return "Debian's ruby-sidekiq is not installed (apt-get install ruby-sidekiq)"
    return None


@dataclass(frozen=True)
class Settings:
    #: Light job counts and headrooms are scaled by these (``--tiny``: fewer, smaller).
    scale: float = 1.0
    headroom_scale: float = 1.0
    stall: float = 30.0
    max_cell_s: float = 240.0
    tries: int = 10
    seed: int = 13


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    mb: float = 0.0
    secs: float = 0.0


#: How much a leaking batch keeps in all, in soft-limit headrooms: a restart or two.
LEAK_VOLUME = 1.4


def plan(w: Workload, f: Framework, s: Settings, idle: int, limit: int, token: str) -> list[Job]:
    """The batch of a cell (the runaway cell's jobs are sent one try at a time). Sized by
    what it does, not by time: a leak keeps about ``LEAK_VOLUME`` headrooms whatever the
    worker's pace, a spike batch holds 2 spikes, a poison batch 12 light jobs a job slot."""
    rnd = random.Random(f"{s.seed}:{f.name}:{w.name}")
    c = f.concurrency
    headroom = (SOFT_SHARE * limit - idle) / MB
    volume = LEAK_VOLUME * headroom

    def n(x: float) -> int:
        return max(4, math.ceil(x))

    specs: list[tuple[str, float, float]] = []
    if w.name == "slow-leak":  # 1 MiB/s in all, whatever the concurrency, for headroom + 4 s
        specs = [("leak", 0.5 / c, 0.5)] * n((headroom + 4) * c / 0.5)
    elif w.name == "fast-leak":  # each job keeps 2-8 MiB in 0.1 s: 50 MiB/s per job slot
        specs = [("leak", rnd.uniform(2, 8), 0.1) for _ in range(n(volume / 5))]
    elif w.name == "big-leak":  # 4 MiB in 256 KiB objects per 0.1 s job
        specs = [("bigleak", 4.0, 0.1)] * n(volume / 4)
    elif w.name == "fragment":  # each job churns 32 MiB, keeps 1.6 and strands about as much
        specs = [("fragment", 32.0, 0.1)] * n(volume / 2.4)
    elif w.name == "spike":  # twice, a job takes memory to 88% of the quota; light between
        spike = ("spike", 0.88 * limit / MB, 1.2)  # the cgroup's working set to 88%
        # The gap outlasts a spike (16 jobs of 0.1 s a job slot: 1.6 s and more), so the
        # second spike starts once the first has let go: two held at once would ask for
        # more than the quota, which no remedy but a kill can meet.
        gap = [("light", 0.0, 0.1)] * n(16 * c)
        specs = [*gap, spike] * 2 + gap
    elif w.name == "poison":  # light jobs; one of them, a fifth in, grows 64 MiB/s
        specs = [("light", 0.0, 0.1)] * n(12 * c * s.scale)
        specs[len(specs) // 5] = ("poison", 64.0, 0.0)
    return [
        Job(f"{token}-{i:04d}-{kind}", kind, round(mb, 3), secs)
        for i, (kind, mb, secs) in enumerate(specs)
    ]


# ------------------------------------------------------------------------ sending jobs
def _django() -> Any:
    """``bench/apps/field_django/cell.py``: a Django cell's database, sender and rows."""
    if APPS not in sys.path:
        sys.path.insert(0, APPS)
    from field_django import cell

    return cell


def _db_cell(family: str) -> Any:
    """The bench's side of a cell kept in PostgreSQL (Django Tasks, Procrastinate): its
    database, sender and rows; None for the others."""
    if family == "django":
        return _django()
    if family == "procrastinate":  # bench/apps/field_procrastinate.py
        if APPS not in sys.path:
            sys.path.insert(0, APPS)
        import field_procrastinate

        return field_procrastinate
    return None


class Sender:
    """Puts jobs on one framework's queue, from this process, the way a web app would."""

    def __init__(self, f: Framework, queue: str, prefix: str, r: Any) -> None:
        self.f, self.queue, self.prefix, self.r = f, queue, prefix, r
        self.env: dict[str, str] = {}  # Django's sender: the cell's environment
        self._celery: Any = None
        self._dramatiq: Any = None
        self._huey: Any = None

    def send(self, jobs: Sequence[Job]) -> None:
        family = self.f.family
        if family == "celery":
            self._send_celery(jobs)
        elif family == "rq":
            from rq import Queue

            q = Queue(self.queue, connection=self.r)
            for j in jobs:
                q.enqueue("field_jobs.run", j.id, j.kind, j.mb, j.secs, job_id=j.id)
        elif family == "dramatiq":
            self._send_dramatiq(jobs)
        elif family == "huey":
            self._send_huey(jobs)
        elif family in ("arq", "taskiq"):  # async clients
            asyncio.run(getattr(self, f"_send_{family}")(jobs))
        elif family in ("django", "procrastinate"):  # through the framework's own API
            cell = _db_cell(family)
            cell.send(self.env, [(j.id, j.kind, j.mb, j.secs) for j in jobs])
        elif family == "run":
            for j in jobs:
                self.r.lpush(self.queue, json.dumps(dataclasses.asdict(j)))
        elif family == "sidekiq":  # as Sidekiq's client pushes (LPUSH; Sidekiq pops the end)
            for j in jobs:
                now = time.time()
                job: dict[str, Any] = {"class": "FieldJob", "args": [j.id, j.kind, j.mb, j.secs]}
                job.update(jid=j.id, queue=self.queue, retry=True, created_at=now, enqueued_at=now)
                self.r.lpush(f"queue:{self.queue}", json.dumps(job))
            self.r.sadd("queues", self.queue)
        else:
            raise SystemExit(f"bench: cannot send jobs to {self.f.name}")

    def _send_celery(self, jobs: Sequence[Job]) -> None:
        if self._celery is None:
            from celery import Celery  # type: ignore[import-untyped]

            self._celery = Celery("field-sender", broker=REDIS)
        for j in jobs:
            self._celery.send_task(
                "field.job", args=[j.id, j.kind, j.mb, j.secs], task_id=j.id, queue=self.queue
            )

    def _send_dramatiq(self, jobs: Sequence[Job]) -> None:
        from dramatiq import Message
        from dramatiq.brokers.redis import RedisBroker

        if self._dramatiq is None:
            self._dramatiq = RedisBroker(url=REDIS, namespace=self.prefix)
        for j in jobs:
            message: Message[Any] = Message(
                queue_name=self.queue,
                actor_name="field_job",
                args=(j.id, j.kind, j.mb, j.secs),
                kwargs={},
                options={},
                message_id=j.id,
            )
            self._dramatiq.enqueue(message)

    def _send_huey(self, jobs: Sequence[Job]) -> None:
        if self._huey is None:
            from huey import RedisHuey  # type: ignore[import-untyped]

            huey = RedisHuey(self.queue, url=REDIS, results=False)

            def field_job(*args: Any) -> None:  # the consumer's task of that name runs it
                pass

            field_job.__module__ = "field_huey"  # huey names a task by module and name
            self._huey = (huey, huey.task(name="field_job")(field_job))
        huey, task = self._huey
        for j in jobs:
            t = task.s(j.id, j.kind, j.mb, j.secs)
            t.id, t.revoke_id = j.id, f"r:{j.id}"
            huey.enqueue(t)

    async def _send_arq(self, jobs: Sequence[Job]) -> None:
        from arq.connections import RedisSettings, create_pool

        pool = await create_pool(RedisSettings(host="127.0.0.1", port=6379, database=11))
        try:
            for j in jobs:
                await pool.enqueue_job(
                    "field_job", j.id, j.kind, j.mb, j.secs, _job_id=j.id, _queue_name=self.queue
                )
        finally:
            await pool.aclose()

    async def _send_taskiq(self, jobs: Sequence[Job]) -> None:
        from taskiq.kicker import AsyncKicker
        from taskiq_redis import RedisStreamBroker

        broker = RedisStreamBroker(REDIS, queue_name=self.queue, consumer_id="0")
        await broker.startup()  # the group, from the stream's start: no job missed
        try:
            for j in jobs:
                kicker = AsyncKicker("field_job", broker, {}).with_task_id(j.id)
                await kicker.kiq(j.id, j.kind, j.mb, j.secs)
        finally:
            await broker.shutdown()

    def close(self) -> None:
        if self._celery is not None:
            self._celery.close()
        if self._dramatiq is not None:
            self._dramatiq.close()


# ------------------------------------------------------------------------ the platform
@dataclass
class Lifetime:
    pid: int
    start: float
    end: float | None = None
    status: int | None = None


class Platform:
    """Keeps one worker running in ``cg``: starts it again, at once, whenever it exits."""

    def __init__(self, cg: BenchCgroup, argv: list[str], env: dict[str, str], log: Any) -> None:
        self.cg, self.argv, self.env, self.log = cg, argv, env, log
        self.lifetimes: list[Lifetime] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.quick_deaths = 0

    def start(self) -> None:
        self.proc = self.cg.spawn(self.argv, self.env, self.log)
        self.lifetimes.append(Lifetime(self.proc.pid, time.time()))

    def tend(self) -> None:
        """Start the worker again if it exited (a worker that dies within a second of its
        start, five times, is a broken cell: stop with an error)."""
        assert self.proc is not None
        status = self.proc.poll()
        if status is None:
            return
        life = self.lifetimes[-1]
        life.end, life.status = time.time(), status
        if life.end - life.start < 1.0:
            self.quick_deaths += 1
            if self.quick_deaths >= 5:
                raise CellBroken(f"the worker died within a second of its start 5 times ({status})")
            time.sleep(0.5)
        self.start()

    def stop(self, timeout: float = 40.0) -> None:
        """The end of the cell: SIGTERM (every worker's warm stop here), SIGKILL later."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        life = self.lifetimes[-1]
        life.end = time.time()  # stopped by the bench: its status is no remedy's end


class CellBroken(Exception):
    pass


# ------------------------------------------------------------------------ one cell
@dataclass
class Cell:
    framework: Framework
    workload: Workload

    @property
    def name(self) -> str:
        return f"{self.framework.name}/{self.workload.name}"


@dataclass
class Figures:
    """What a cell measured (summed over rounds by :func:`combine`)."""

    cell: str
    jobs: int = 0
    lost: int = 0
    dup: int = 0
    oom_kills: int = 0
    graceful: int = 0
    kills: int = 0
    cut: int = 0
    restarts: int = 0
    recycles: int = 0
    reclaims: int = 0
    pauses: int = 0
    innocents: int = 0
    poison_kills: int = 0
    warden_errors: int = 0
    poison_ok: str = "-"
    kernel_wins: int = 0
    memwarden_wins: int = 0
    tries: int = 0
    limit: int = 0
    idle: int = 0
    peak: int = 0
    over_hard_s: float = 0.0
    seconds: float = 0.0
    jobs_per_s: float = 0.0
    rounds: int = 1
    why: list[str] = field(default_factory=list)

    @property
    def remedies(self) -> int:
        return self.graceful + self.kills + self.cut

    @property
    def graceful_pct(self) -> float | None:
        return 100.0 * self.graceful / self.remedies if self.remedies else None

    @property
    def verdict(self) -> str:
        return "red" if self.why else "green"

    def judge(self, poison_cell: bool, runaway: bool, exactly_once: bool = False) -> None:
        why = []
        if self.lost:
            why.append("lost")
        if exactly_once and self.dup:
            why.append("dup")
        if self.oom_kills:
            why.append("oom")
        if self.innocents:
            why.append("innocent")
        if poison_cell and self.poison_ok != "yes":
            why.append("poison")
        pct = self.graceful_pct  # a poison or runaway job can only be killed: no goal there
        if not (poison_cell or runaway) and pct is not None and pct < 100 * GRACEFUL_GOAL:
            why.append("graceful")
        if runaway and self.kernel_wins:
            why.append("kernel")
        if self.warden_errors:  # the guard itself failed: whatever it did not do, it did not
            why.append("warden-error")
        self.why = why

    def line(self) -> str:
        pct = self.graceful_pct
        parts = [
            f"cell={self.cell}",
            f"jobs={self.jobs}",
            f"lost={self.lost}",
            f"dup={self.dup}",
            f"oom_kills={self.oom_kills}",
            f"graceful={self.graceful}",
            f"kills={self.kills}",
            f"poison_ok={self.poison_ok}",
            f"verdict={self.verdict}",
            f"why={','.join(self.why) or '-'}",
            f"graceful_pct={'-' if pct is None else f'{pct:.0f}'}",
            f"cut={self.cut}",
            f"restarts={self.restarts}",
            f"recycles={self.recycles}",
            f"reclaims={self.reclaims}",
            f"pauses={self.pauses}",
            f"innocents={self.innocents}",
            f"poison_kills={self.poison_kills}",
            f"warden_errors={self.warden_errors}",
        ]
        if self.tries:
            parts += [
                f"tries={self.tries}",
                f"memwarden_wins={self.memwarden_wins}",
                f"kernel_wins={self.kernel_wins}",
            ]
        parts += [
            f"limit_mib={self.limit / MB:.0f}",
            f"idle_mib={self.idle / MB:.0f}",
            f"peak_mib={self.peak / MB:.0f}",
            f"over_hard_s={self.over_hard_s:.1f}",
            f"seconds={self.seconds:.1f}",
            f"jobs_per_s={self.jobs_per_s:.2f}",
            f"rounds={self.rounds}",
        ]
        return " ".join(parts)


def cell_env(f: Framework, queue: str, prefix: str, journal: str, state: str, cap_mb: int) -> dict:
    """Default memwarden settings: only a journal and a private state dir are set."""
    env = {k: v for k, v in bench_env().items() if not k.startswith(("MEMWARDEN_", "RQ_"))}
    env.update(
        MEMWARDEN_JOURNAL=journal,
        MEMWARDEN_STATE_DIR=state,
        FIELD_REDIS=REDIS,
        FIELD_PREFIX=prefix,
        FIELD_QUEUE=queue,
        FIELD_CAP_MB=str(cap_mb),
        FIELD_CONCURRENCY=str(f.concurrency),
        REDIS_URL=REDIS,  # Sidekiq's
        PYTHONUNBUFFERED="1",
    )
    return env


def worker_argv(f: Framework, queue: str) -> list[str]:
    argv = list(f.argv)
    if f.family == "rq":
        argv += ["-u", REDIS, queue]
    if f.family == "sidekiq":
        argv += ["-q", queue]
    return argv


class Run:
    """One cell's run: its ids, cgroup, worker, journal."""

    def __init__(self, cell: Cell, s: Settings, workdir: str, idle: int) -> None:
        self.cell, self.s, self.idle = cell, s, idle
        self.token = f"mwf{uuid.uuid4().hex[:8]}"
        self.prefix = f"mw-field:{self.token}"
        self.queue = f"field-{self.token}"  # a name every framework takes (Dramatiq: no colon)
        f, w = cell.framework, cell.workload
        headroom = w.headroom(idle / MB) * s.headroom_scale * MB
        self.limit = int(math.ceil((idle + headroom) / SOFT_SHARE / (4 * MB)) * 4 * MB)
        base = os.path.join(workdir, f"{f.name}-{w.name}-{self.token}")
        self.journal = base + ".jsonl"
        self.state = base + "-state"
        self.log_path = base + ".log"
        self.env = cell_env(f, self.queue, self.prefix, self.journal, self.state,
                            cap_mb=2 * self.limit // MB)  # fmt: skip
        # Typed Any: redis-py's stubs mix its async return types into the sync client's.
        self.r: Any = redis.Redis.from_url(REDIS)
        cell = _db_cell(f.family)
        if cell is not None:  # a PostgreSQL database of the cell's own
            self.env.update(cell.create(self.token, self.env))

    def records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for p in [*(f"{self.journal}.{i}" for i in (3, 2, 1)), self.journal]:
            with contextlib.suppress(OSError), open(p) as fh:
                out += read_records(fh)[0]
        cell = _db_cell(self.cell.framework.family)
        if cell is not None:  # its job ids are the rows' ids
            out = cell.translate(out, cell.bench_ids(self.token))
        return [r for r in out if not r.get("dry_run")]

    def done(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.r.hgetall(f"{self.prefix}:done").items()}

    def runs_of(self, job_id: str) -> int:
        return int(self.r.hget(f"{self.prefix}:runs", job_id) or 0)

    def runs(self) -> int:
        return sum(int(v) for v in self.r.hvals(f"{self.prefix}:runs"))

    def poison_counts(self) -> dict[str, int]:
        """memwarden's kill counts of this cell's job ids (what counts towards poison)."""
        cell = _db_cell(self.cell.framework.family)
        if cell is not None:  # kept in the rows
            return cell.kill_counts(self.token)
        out = {}
        for key in self.r.scan_iter(f"memwarden:kills:{self.token}-*", count=1000):
            value = self.r.get(key)
            if value is not None:
                out[key.decode().split(":", 2)[2]] = int(value)
        return out

    def forget(self) -> None:
        """Delete whatever this cell left in Redis (every key and entry naming its token)."""
        r, token = self.r, self.token
        doomed = [k for k in r.scan_iter(f"*{token}*", count=1000)]
        for at in range(0, len(doomed), 500):
            r.delete(*doomed[at : at + 500])
        for tag, payload in r.hscan_iter("unacked"):  # kombu's unacked messages (Celery)
            if token.encode() in payload:
                r.hdel("unacked", tag)
                r.zrem("unacked_index", tag)
        for key in r.scan_iter("rq:worker:*", count=1000):  # RQ workers killed on our queue
            with contextlib.suppress(redis.ResponseError):
                if token.encode() in (r.hget(key, "queues") or b""):
                    r.delete(key, key + b":executions")
                    r.srem("rq:workers", key)
        r.srem("rq:queues", f"rq:queue:{self.queue}")
        cell = _db_cell(self.cell.framework.family)
        if cell is not None:
            cell.drop(self.token)
        if self.cell.framework.family == "sidekiq":
            self._forget_sidekiq()

    def _forget_sidekiq(self) -> None:
        """Sidekiq's own keys: its processes' heartbeats (``host:pid:nonce``, whose info
        names our queue), its sets of jobs, its counters (this DB is the bench's alone)."""
        r, token = self.r, self.token.encode()
        r.srem("queues", self.queue)
        for key in r.scan_iter("*:*:*", count=1000):
            with contextlib.suppress(redis.ResponseError):
                if token in (r.hget(key, "info") or b""):
                    r.delete(key, key + b":workers")
                    r.srem("processes", key)
        for zset in ("retry", "dead", "schedule"):
            for member in r.zrange(zset, 0, -1):
                if token in member:
                    r.zrem(zset, member)
        stats = list(r.scan_iter("stat:*", count=1000))
        if stats:
            r.delete(*stats)


def wait_for(what: str, cond: Callable[[], bool], timeout: float, tend: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise CellBroken(f"{what}: not within {timeout:g}s")
        tend()
        time.sleep(0.1)


def run_cell(cell: Cell, s: Settings, workdir: str, idle: int) -> Figures:
    f, w = cell.framework, cell.workload
    run = Run(cell, s, workdir, idle)
    fig = Figures(cell=cell.name, limit=run.limit, idle=idle)
    sender = Sender(f, run.queue, run.prefix, run.r)
    sender.env = run.env
    os.makedirs(run.state, exist_ok=True)
    argv = worker_argv(f, run.queue)
    t_begin = time.monotonic()
    try:
        with (
            dyno(run.limit) as cg,
            Sampler(cg, over=int(HARD_SHARE * run.limit)) as sampler,
            open(run.log_path, "ab") as log,
        ):
            platform = Platform(cg, argv, run.env, log)
            platform.start()
            probe = Job(f"{run.token}-probe", "light", 0, 0.0)
            sender.send([probe])
            wait_for("the worker's first job", lambda: probe.id in run.done(), 120, platform.tend)
            if w.name == "runaway":
                jobs = [probe, *runaway_tries(run, s, sender, platform, cg, fig)]
                poison = None
            else:
                batch = plan(w, f, s, idle, run.limit, run.token)
                jobs = [probe, *batch]
                poison = next((j.id for j in batch if j.kind == "poison"), None)
                t0 = time.time()
                sender.send(batch)
                follow(run, s, jobs, poison, platform)
                fig.jobs_per_s = len(batch) / max(1e-3, time.time() - t0)
            time.sleep(1.0)  # a duplicate on its way has a moment to land
            platform.tend()
            platform.stop()
            fig.oom_kills = cg.oom_kills()
        fig.peak, fig.over_hard_s = sampler.peak, sampler.over_limit_s
        statuses = [life.status for life in platform.lifetimes]
        print(f"#   {cell.name}: the worker's exits {statuses}", file=sys.stderr, flush=True)
        counted = {i for i, n in run.poison_counts().items() if n > 0}
        count(fig, jobs, poison, run.done(), run.records(), counted, platform.lifetimes)
        fig.warden_errors = warden_errors(run.log_path)
    except CellBroken as exc:
        fig.why = [f"broken:{str(exc).replace(' ', '_')}"]
        print(f"# {cell.name}: {exc} (log: {run.log_path})", file=sys.stderr)
        return fig
    finally:
        sender.close()
        run.forget()
        run.r.close()
    fig.seconds = time.monotonic() - t_begin
    fig.judge(
        poison_cell=w.name == "poison",
        runaway=w.name == "runaway",
        exactly_once=f.delivery == "exactly once",
    )
    return fig


def follow(
    run: Run, s: Settings, jobs: Sequence[Job], poison: str | None, platform: Platform
) -> None:
    """Tend the worker until every job is done (the poison one done or quarantined), or
    nothing has moved for ``stall`` seconds, or the cell's time is up."""
    need = [j.id for j in jobs if j.id != poison]
    moved_at, last = time.monotonic(), (-1, -1)
    deadline = time.monotonic() + s.max_cell_s
    looked_at = 0.0
    quarantined = False
    while True:
        platform.tend()
        done = run.done()
        now = time.monotonic()
        state = (run.runs(), len(done))
        if state != last:
            moved_at, last = now, state
        if poison is not None and not quarantined and now - looked_at > 1.0:
            looked_at = now
            quarantined = poison in quarantined_ids(run.records())
        if all(i in done for i in need) and (poison is None or poison in done or quarantined):
            return
        if poison is not None and not quarantined and run.runs_of(poison) > POISON_KILLS + 2:
            return  # run again and again, never quarantined: it never will be
        if now - moved_at > s.stall or now > deadline:
            return
        time.sleep(0.2)


def quarantined_ids(records: Sequence[dict[str, Any]]) -> set[str]:
    return {str(r.get("job_id")) for r in records if r.get("event") in ("poison", "quarantine")}


def runaway_tries(
    run: Run, s: Settings, sender: Sender, platform: Platform, cg: BenchCgroup, fig: Figures
) -> list[Job]:
    """``tries`` runaway jobs, one at a time: each allocates 1 GiB/s on its first run
    (light after). Who stopped it: the kernel (the cgroup's OOM counter moved) or memwarden
    (a kill or restart record, the counter still)."""
    jobs = []
    for k in range(s.tries):
        job = Job(f"{run.token}-{k:04d}-runaway", "runaway", 1024.0, 0.1)
        jobs.append(job)
        ooms, acts = cg.oom_kills(), remedies_in(run.records())
        sender.send([job])
        with contextlib.suppress(CellBroken):
            wait_for("the runaway job", lambda j=job: j.id in run.done(), 90, platform.tend)  # type: ignore[misc]
        fig.tries += 1
        if cg.oom_kills() > ooms:
            fig.kernel_wins += 1
        elif remedies_in(run.records()) > acts:
            fig.memwarden_wins += 1
    return jobs


def remedies_in(records: Sequence[dict[str, Any]]) -> int:
    return sum(1 for r in records if r.get("event") in ("kill", "restart"))


# ------------------------------------------------------------------------ counting
#: How a drained worker may end: exit 0 or 75 (memwarden's restart by exit), or its own
#: stop signal's default action (SIGTERM, SIGINT), as a Popen status or a shell status.
CLEAN_ENDS = {0, 75} | {s for n in (signal.SIGTERM, signal.SIGINT) for s in (-n, 128 + n)}


def count(
    fig: Figures,
    jobs: Sequence[Job],
    poison: str | None,
    done: dict[str, int],
    records: Sequence[dict[str, Any]],
    counted: set[str],
    lifetimes: Sequence[Lifetime],
) -> None:
    """Fill ``fig`` from the completions (``done``: id -> completions), the journal's
    ``records``, the ids memwarden counted towards poison (``counted``, its kill counts in
    Redis) and the worker's ``lifetimes``."""
    quarantined = quarantined_ids(records)
    fig.jobs = len(jobs)  # a poison job quarantined is no loss; one that vanished is
    fig.lost = sum(1 for j in jobs if j.id not in done and j.id not in quarantined)
    fig.dup = sum(max(0, n - 1) for n in done.values())
    fig.reclaims = sum(1 for r in records if r.get("event") == "reclaim")
    fig.pauses = sum(1 for r in records if r.get("event") == "pause")
    graceful_and_hard(fig, records, lifetimes)
    kills = [r for r in records if r.get("event") == "kill"]
    counted = set(counted)
    for r in kills:
        counted |= in_flight_ids(r)
    # The jobs that grow without end are the culprits: the poison job, and each runaway job
    # (in flight at its own kill, now that `run` learns the jobs of its command).
    innocent = {j.id for j in jobs if j.id != poison and j.kind != "runaway"}
    fig.innocents = len(counted & innocent)
    if poison is not None:
        fig.poison_kills = sum(1 for r in kills if poison in in_flight_ids(r))
        ok = poison in quarantined and fig.poison_kills <= POISON_KILLS
        fig.poison_ok = "yes" if ok else "no"


def in_flight_ids(record: dict[str, Any]) -> set[str]:
    return {str(j.get("job_id")) for j in record.get("in_flight") or []}


def graceful_and_hard(
    fig: Figures, records: Sequence[dict[str, Any]], lifetimes: Sequence[Lifetime]
) -> None:
    """Each remedy once: a kill record is hard; a pool child's recycle is graceful; a
    worker's restart record is graceful when no kill of the same process follows it and
    the process then ended cleanly (:data:`CLEAN_ENDS`; its status from ``memwarden run``'s
    ``exit`` record or from the bench, which started it; not known for a process the
    bench did not start, such as a Dramatiq worker process: then no kill is enough); else
    it is hard (``cut`` when no memwarden kill cut it: the kernel's SIGKILL, a crash)."""
    ended = {life.pid: life.status for life in lifetimes if life.status is not None}
    for r in records:
        if r.get("event") == "exit" and "supervisor" in r:  # memwarden run's own record
            ended[int(r["pid"])] = int(r.get("status", 0))
    kills: dict[int, list[float]] = {}
    for r in records:
        if r.get("event") == "kill":
            fig.kills += 1
            kills.setdefault(int(r.get("pid", 0)), []).append(float(r.get("ts", 0)))
    for r in records:
        if r.get("event") != "restart":
            continue
        if r.get("action") in ("recycle", "leave"):
            fig.recycles += 1
            fig.graceful += 1
            continue
        fig.restarts += 1
        pid, ts = int(r.get("pid", 0)), float(r.get("ts", 0))
        if any(t >= ts for t in kills.get(pid, [])):
            continue  # the kill is this remedy's end, counted once, as hard
        if pid in ended and ended[pid] not in CLEAN_ENDS:
            fig.cut += 1
        else:
            fig.graceful += 1


#: memwarden's own failures in a worker's log: the guard did not run, or a hook failed.
WARDEN_ERROR = re.compile(
    r"memwarden: (internal error|the \w+ hook failed|before_kill hook failed|asking the pool "
    r"to reclaim failed|could not|.*runs unguarded|.*WITHOUT memory guard|giving back dead "
    r"workers' messages failed)"
)


def warden_errors(log_path: str) -> int:
    """Lines of the cell's worker log where memwarden says it failed."""
    with contextlib.suppress(OSError), open(log_path, errors="replace") as f:
        return sum(1 for line in f if WARDEN_ERROR.search(line))
    return 0


# ------------------------------------------------------------------------ idle size
def idle_size(f: Framework, s: Settings, workdir: str) -> int:
    """The working set of the framework's worker, idle after one light job, in a cgroup
    too big for any remedy (the same default settings otherwise)."""
    cell = Cell(f, WORKLOADS["fast-leak"])
    run = Run(cell, s, workdir, 0)
    sender = Sender(f, run.queue, run.prefix, run.r)
    sender.env = run.env
    os.makedirs(run.state, exist_ok=True)
    try:
        with dyno(2048 * MB) as cg, open(run.log_path, "ab") as log:
            platform = Platform(cg, worker_argv(f, run.queue), run.env, log)
            platform.start()
            probe = Job(f"{run.token}-probe", "light", 0, 0.0)
            sender.send([probe])
            wait_for("the idle probe's job", lambda: probe.id in run.done(), 120, platform.tend)
            time.sleep(1.5)
            sizes = []
            for _ in range(5):
                sizes.append(cg.working_set())
                time.sleep(0.2)
            platform.stop()
        return sorted(sizes)[len(sizes) // 2]
    finally:
        sender.close()
        run.forget()
        run.r.close()


# ------------------------------------------------------------------------ rounds, report
def combine(rounds: Sequence[Figures]) -> Figures:
    """A cell's rounds as one: counts summed, peak the highest, red if any round was."""
    if len(rounds) == 1:
        return rounds[0]
    first = rounds[0]
    out = dataclasses.replace(first, why=sorted({w for r in rounds for w in r.why}))
    for name in ("jobs", "lost", "dup", "oom_kills", "graceful", "kills", "cut", "restarts",
                 "recycles", "reclaims", "pauses", "innocents", "poison_kills", "kernel_wins",
                 "memwarden_wins", "tries", "warden_errors", "over_hard_s", "seconds"):  # fmt: skip
        setattr(out, name, sum(getattr(r, name) for r in rounds))
    out.peak = max(r.peak for r in rounds)
    out.jobs_per_s = sorted(r.jobs_per_s for r in rounds)[len(rounds) // 2]
    oks = {r.poison_ok for r in rounds}
    out.poison_ok = "no" if "no" in oks else first.poison_ok
    out.rounds = len(rounds)
    return out


COLUMNS = [
    ("quota", "limit_bytes"),
    ("jobs", "jobs"),
    ("lost", "lost"),
    ("dup", "dup"),
    ("OOM kills", "oom_kills"),
    ("graceful", "graceful"),
    ("kills", "kills"),
    ("graceful %", "graceful_pct"),
    ("restarts", "restarts"),
    ("recycles", "recycles"),
    ("reclaims", "reclaims"),
    ("pauses", "pauses"),
    ("poison", "poison_ok"),
    ("innocents", "innocents"),
    ("warden errors", "warden_errors"),
    ("peak", "peak_bytes"),
    ("s", "seconds"),
    ("verdict", "verdict"),
]


def as_result(fig: Figures) -> Result:
    """A cell as the harness's :class:`Result`, for :func:`_harness.table`."""
    pct = fig.graceful_pct
    verdict = fig.verdict + (f" ({', '.join(fig.why)})" if fig.why else "")
    if fig.tries:
        verdict += f"; memwarden first {fig.memwarden_wins}, kernel {fig.kernel_wins}"
    return Result(
        name=fig.cell,
        jobs_per_s=fig.jobs_per_s,
        lost=fig.lost,
        oom_kills=fig.oom_kills,
        over_limit_s=fig.over_hard_s,
        peak_bytes=fig.peak,
        restarts=fig.restarts,
        extra={
            "limit_bytes": fig.limit,
            "jobs": fig.jobs,
            "dup": fig.dup,
            "graceful": fig.graceful,
            "kills": fig.kills + fig.cut,
            "graceful_pct": "-" if pct is None else f"{pct:.0f}",
            "recycles": fig.recycles,
            "reclaims": fig.reclaims,
            "pauses": fig.pauses,
            "poison_ok": fig.poison_ok,
            "innocents": fig.innocents,
            "warden_errors": fig.warden_errors,
            "seconds": round(fig.seconds),
            "verdict": verdict,
        },
    )


def matrix(figs: Sequence[Figures], skipped: dict[str, str]) -> str:
    """Frameworks × workloads, one word (or the failures) per cell: the README's table."""
    by = {fig.cell: fig for fig in figs}
    names = [w for w in MATRIX_WORKLOADS if any(c.endswith(f"/{w}") for c in by)]
    frameworks = [f for f in FRAMEWORKS if any(c.startswith(f"{f}/") for c in by) or f in skipped]
    rows = [
        "| worker | " + " | ".join(WORKLOADS[w].title for w in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for f in frameworks:
        if f in skipped:
            rows.append(f"| {f} | " + " | ".join("not run" for _ in names) + " |")
            continue
        cells = []
        for w in names:
            fig = by.get(f"{f}/{w}")
            cells.append("" if fig is None else short(fig))
        rows.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def short(fig: Figures) -> str:
    """A matrix cell: "ok" or the failures (bold), then the remedies that ended a process."""
    done = [f"{n} {what}" for n, what in ((fig.graceful, "graceful"), (fig.kills, "killed"),
            (fig.cut, "cut")) if n]  # fmt: skip
    remedies = " · " + ", ".join(done) if done else " · none needed"
    if not fig.why:
        return "ok" + remedies
    bits = []
    for why in fig.why:
        if why == "lost":
            bits.append(f"{fig.lost} lost")
        elif why == "oom":
            bits.append(f"{fig.oom_kills} OOM")
        elif why == "innocent":
            bits.append(f"{fig.innocents} innocent")
        elif why == "poison":
            bits.append("poison not quarantined")
        elif why == "graceful":
            bits.append(f"{fig.graceful_pct:.0f}% graceful")
        elif why == "kernel":
            bits.append(f"kernel first {fig.kernel_wins}/{fig.tries}")
        elif why == "dup":
            bits.append(f"{fig.dup} run twice")
        elif why == "warden-error":
            bits.append(f"{fig.warden_errors} warden errors")
        else:
            bits.append(why)
    return "**" + ", ".join(bits) + "**" + remedies


def report(figs: Sequence[Figures], skipped: dict[str, str], argv: Sequence[str]) -> str:
    green = sum(1 for f in figs if not f.why)
    runaway = [f for f in figs if f.tries]
    lines = [
        f"Command: `python bench/field.py {' '.join(argv)}`",
        f"Machine: {machine()}.",
        "",
        f"{green} of {len(figs)} cells green.",
        "",
        matrix(figs, skipped),
        "",
        LEGEND,
        "",
    ]
    for fig in runaway:
        lines.append(
            f"Runaway ({fig.cell}, 1 GiB/s, {fig.tries} tries): memwarden stopped it first "
            f"{fig.memwarden_wins} times, the kernel {fig.kernel_wins} times."
        )
    for name, why in skipped.items():
        lines.append(f"{name}: not run ({why}).")
    lines += ["", table([as_result(f) for f in figs], COLUMNS, label="cell")]
    return "\n".join(lines)


LEGEND = (
    "After the verdict, the remedies that ended a process: *graceful* (a drain then a clean "
    "exit, or a pool child recycled after its job), *killed* (by memwarden), *cut* (a drain "
    "ended by a SIGKILL that was not memwarden's)."
)


def headline(figs: Sequence[Figures], skipped: dict[str, str], argv: Sequence[str]) -> str:
    green = sum(1 for f in figs if not f.why)
    rounds = max((f.rounds for f in figs), default=1)
    lines = [matrix(figs, skipped), "", LEGEND, ""]
    for fig in figs:
        if fig.tries:
            lines.append(
                f"Runaway (1 GiB/s, {fig.cell}, {fig.tries} tries): memwarden first "
                f"{fig.memwarden_wins}, the kernel {fig.kernel_wins}."
            )
    lines.append(
        f"{green} of {len(figs)} cells green; `python bench/field.py {' '.join(argv)}`, "
        f"{'one run' if rounds == 1 else f'{rounds} rounds'}. Machine: {machine()}."
    )
    return "\n".join(lines)


def publish(text: str, out: str | None, readme: str | None, head: str) -> None:
    """``out``: the report into ``<out>/field.md``'s ``field`` block (the file made if it
    has none); ``readme``: the ``field-headline`` block."""
    if out:
        path = os.path.join(out, "field.md")
        if not replace_block(path, "field", text):
            write_text(path, f"# The field matrix\n\n<!-- bench:field -->\n{text}\n"
                             "<!-- /bench:field -->\n")  # fmt: skip
    if readme:
        replace_block(readme, "field-headline", head)


def choose_cells(p: argparse.ArgumentParser, text: str | None, tiny: bool) -> list[str]:
    """The cells named by ``text``'s comma-separated patterns (``celery-*/spike``, ``run/*``):
    cells of the matrix; the runaway cells beyond the matrix's own when the pattern says
    ``runaway``."""
    if not text:
        return list(TINY_CELLS) if tiny else all_cells()
    every = all_cells() + [
        f"{f}/runaway" for f in FRAMEWORKS if f"{f}/runaway" not in RUNAWAY_CELLS
    ]
    picked: list[str] = []
    for pattern in (t.strip() for t in text.split(",") if t.strip()):
        pool = every if "runaway" in pattern else all_cells()
        hits = [c for c in pool if fnmatch.fnmatchcase(c, pattern)]
        if not hits:
            p.error(f"no cell matches {pattern!r}; cells look like celery-prefork/fast-leak")
        picked += [c for c in hits if c not in picked]
    return picked


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--cells", help="comma-separated cells or patterns (celery-*/spike, run/*)")
    p.add_argument("--rounds", type=int, default=1, help="run every cell this many times")
    p.add_argument("--tiny", action="store_true", help="a few small, short cells (the tests)")
    p.add_argument("--tries", type=int, help="runaway tries (default 10, tiny 2)")
    p.add_argument("--stall", type=float, help="end a cell after so long with no job run")
    p.add_argument("--list", action="store_true", help="print the cells and exit")
    p.add_argument("--out", help="write the report into <out>/field.md")
    p.add_argument("--readme", help="put the headline table into this file's marked block")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds must be at least 1 (got {a.rounds})")
    s = _settings(a.tiny, a.tries, a.stall)
    cells = choose_cells(p, a.cells, a.tiny)
    if a.list:
        print("\n".join(cells))
        return 0
    runnable, skipped = _runnable(cells)
    per = _run_rounds(runnable, a.rounds, s)
    figs = [combine(rounds) for rounds in per.values() if rounds]
    text = report(figs, skipped, argv)
    print(text)
    publish(text, a.out, a.readme, headline(figs, skipped, argv))
    print()
    for name, why in skipped.items():
        print(f"# skipped {name}: {why}")
    for fig in figs:
        print(fig.line())
    return 0


def _settings(tiny: bool, tries: int | None, stall: float | None) -> Settings:
    """The bench's settings: the tiny ones for the tests, and the tries and stall given."""
    s = Settings(scale=0.4, headroom_scale=0.6, stall=15.0, tries=2) if tiny else Settings()
    if tries is not None:
        s = dataclasses.replace(s, tries=tries)
    if stall is not None:
        s = dataclasses.replace(s, stall=stall)
    return s


def _runnable(cells: list[str]) -> tuple[list[str], dict[str, str]]:
    """The cells whose framework can run here, and why each other framework cannot."""
    skipped = {}
    runnable = []
    for c in cells:
        fw = c.split("/")[0]
        reason = why_not(fw)
        if reason:
            skipped[fw] = reason
        else:
            runnable.append(c)
    return runnable, skipped


def _run_rounds(runnable: list[str], rounds: int, s: Settings) -> dict[str, list[Figures]]:
    """Every cell run ``rounds`` times, in a working directory removed after (kept with
    ``BENCH_KEEP``); a framework whose idle worker cannot be measured has broken cells."""
    workdir = tempfile.mkdtemp(prefix="memwarden-field-")
    idle: dict[str, int] = {}
    broken: dict[str, str] = {}
    per: dict[str, list[Figures]] = {c: [] for c in runnable}
    try:
        for k in range(rounds):
            for c in runnable:
                fw, wl = c.split("/")
                f = FRAMEWORKS[fw]
                if fw not in idle:
                    _measure_idle(fw, s, workdir, idle, broken)
                if fw in broken:
                    per[c].append(Figures(cell=c, why=[broken[fw]]))
                    continue
                tag = f" (round {k + 1}/{rounds})" if rounds > 1 else ""
                print(f"# {c}{tag} ...", file=sys.stderr, flush=True)
                fig = run_cell(Cell(f, WORKLOADS[wl]), s, workdir, idle[fw])
                print(f"#   {fig.line()}", file=sys.stderr, flush=True)
                per[c].append(fig)
    finally:
        if os.environ.get("BENCH_KEEP"):
            print(f"# kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return per


def _measure_idle(
    fw: str, s: Settings, workdir: str, idle: dict[str, int], broken: dict[str, str]
) -> None:
    """Framework ``fw``'s idle worker into ``idle`` (-1, and why in ``broken``, when it
    cannot be measured)."""
    print(f"# {fw}: measuring the idle worker ...", file=sys.stderr, flush=True)
    try:
        idle[fw] = idle_size(FRAMEWORKS[fw], s, workdir)
    except CellBroken as exc:
        idle[fw] = -1
        broken[fw] = f"broken:idle_{exc}".replace(" ", "_")
    said = broken.get(fw) or f"idle {format_size(idle[fw])}"
    print(f"# {fw}: {said}", file=sys.stderr, flush=True)


def parse(text: str) -> list[dict[str, Any]]:
    """The ``cell=...`` lines of this bench's output, as dicts."""
    return parse_lines(text, key="cell")


if __name__ == "__main__":
    sys.exit(main())
