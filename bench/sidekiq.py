"""A ``ps``-after-each-job restart middleware beside ``memwarden run --drain-signal TSTP``.

Sidekiq (Debian's ``ruby-sidekiq``) on Redis, the same jobs for every contender: ``--jobs``
KeepJobs that each keep ``--mb`` MB for good (``bench/apps/sidekiq/jobs.rb``), ``-c 5``, in a
fresh memory cgroup of ``--limit`` per contender (the kernel's OOM killer is the judge). A
dyno manager (:class:`Platform`) starts the contender's command, starts it again whenever it
exits, and on a restart request sends SIGTERM to it and SIGKILL 30 s later, as Heroku does.

- ``ps-after-each-job``: ``sidekiq`` with a ``MemoryKiller`` middleware
  (``bench/apps/sidekiq/memory_killer.rb``): after each job the RSS of the process by ``ps``;
  over ``SIDEKIQ_MEMORY_KILLER_MAX_RSS`` (here memwarden's default soft limit, 85% of the
  cgroup), once, after ``--middleware-grace`` (its usual default, 120 s), the dyno restart.
- ``memwarden-run``: ``memwarden run --drain-signal TSTP -- sidekiq …``, default limits
  (from the cgroup).
- ``memwarden-run-no-drain``: the same without the drain signal (what TSTP adds).

Per contender: jobs lost (never completed: Sidekiq's basic fetch drops the jobs in hand
when the process is SIGKILLed), the kernel's OOM kills, restarts (lifetimes the remedy
replaced; ``hard_kills`` of them by SIGKILL), jobs/s (jobs done over the time to the last),
jobs run twice. Last, one line per contender::

    contender=<name> jobs_per_s=<float> lost=<int> oom_kills=<int> restarts=<int> ...

Usage::

    python bench/sidekiq.py                       # 200 jobs x 8 MB, 512 MiB cgroups
    python bench/sidekiq.py --tiny                # 60 jobs: a quick look (the test runs it)
    python bench/sidekiq.py --doc docs/sidekiq.md # also the figures into that page
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (
    APPS,
    BenchCgroup,
    Result,
    Sampler,
    bench_env,
    choose,
    dyno,
    machine,
    replace_block,
    run_each,
    table,
)
from memwarden.units import format_size, parse_size

ORDER = ("ps-after-each-job", "memwarden-run", "memwarden-run-no-drain")
APP = os.path.join(APPS, "sidekiq")
DONE = "mw:sidekiq:done"
QUEUE = "mw-bench"
#: Heroku's window between the dyno restart's SIGTERM and its SIGKILL.
PLATFORM_KILL_AFTER = 30.0
#: No job done for this long with the queue empty: what is not done is lost.
STALL = 20.0
COLUMNS = [
    ("jobs/s", "jobs_per_s"),
    ("lost", "lost"),
    ("OOM kills", "oom_kills"),
    ("restarts", "restarts"),
    ("of them hard kills", "hard_kills"),
    ("ran twice", "duplicates"),
    ("peak", "peak_bytes"),
]


@dataclass
class Platform:
    """A dyno manager in a thread: ``argv`` in the cgroup, in its own session, started again
    whenever it exits; a restart request (``restart_file`` appears) is SIGTERM to the
    session, SIGKILL ``PLATFORM_KILL_AFTER`` later."""

    argv: list[str]
    env: dict[str, str]
    cg: BenchCgroup
    log: Any
    restart_file: str
    starts: int = 0
    restarts: int = 0
    hard_kills: int = 0
    exits: list[int] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="platform", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.proc = subprocess.Popen(
                self.argv,
                cwd=APP,
                env=self.env,
                stdout=self.log,
                stderr=subprocess.STDOUT,
                preexec_fn=self.cg.join,
                start_new_session=True,
            )
            self.starts += 1
            self.exits.append(self._watch(self.proc))
            _killpg(self.proc.pid, signal.SIGKILL)  # what is left of the dyno goes

    def _watch(self, proc: subprocess.Popen[bytes]) -> int:
        term_at: float | None = None
        while proc.poll() is None and not self._stop.is_set():
            if term_at is None and os.path.exists(self.restart_file):
                os.remove(self.restart_file)
                self.restarts += 1
                term_at = time.monotonic()
                _killpg(proc.pid, signal.SIGTERM)
            if term_at is not None and time.monotonic() - term_at > PLATFORM_KILL_AFTER:
                self.hard_kills += 1
                _killpg(proc.pid, signal.SIGKILL)
                term_at = float("inf")
            time.sleep(0.05)
        return proc.wait()

    def stop(self) -> None:
        """The end of the run: SIGTERM, SIGKILL 30 s later, no new start."""
        self._stop.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(PLATFORM_KILL_AFTER)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._thread is not None:
            self._thread.join(PLATFORM_KILL_AFTER + 10)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pgid, sig)


def enqueue(conn: Any, jobs: int, mb: int) -> None:
    """The jobs as Sidekiq's client pushes them (LPUSH; Sidekiq pops the other end)."""
    pipe = conn.pipeline()
    for number in range(jobs):
        now = time.time()
        job: dict[str, Any] = {"class": "KeepJob", "args": [number, mb]}
        job.update(jid=secrets.token_hex(12))
        job.update(queue=QUEUE, retry=True, created_at=now, enqueued_at=now)
        pipe.lpush(f"queue:{QUEUE}", json.dumps(job))
    pipe.sadd("queues", QUEUE)
    pipe.execute()


def wait_done(conn: Any, jobs: int, timeout: float) -> float:
    """Until every job is done, or none is queued and none got done for ``STALL`` seconds
    (the rest are lost), or ``timeout``; returns the time of the last job done."""
    t0 = time.monotonic()
    seen, last = -1, t0
    while time.monotonic() - t0 < timeout:
        done = conn.hlen(DONE)
        if done != seen:
            seen, last = done, time.monotonic()
        if done >= jobs:
            break
        if conn.llen(f"queue:{QUEUE}") == 0 and time.monotonic() - last > STALL:
            break
        time.sleep(0.2)
    return last - t0


def journal_counts(path: str) -> tuple[int, int, int]:
    """(lifetimes replaced, of them by SIGKILL, lifetimes) from ``memwarden run``'s
    journal."""
    restarts = kills = starts = 0
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            event = json.loads(line)["event"]
            restarts += event in ("restart", "kill")
            kills += event == "kill"
            starts += event == "start"
    return restarts, kills, starts


def command(name: str, args: argparse.Namespace, journal: str) -> tuple[list[str], dict[str, str]]:
    sidekiq = ["sidekiq", "-r", "./jobs.rb", "-c", str(args.concurrency), "-q", QUEUE, "-t", "20"]
    env = {k: v for k, v in bench_env().items() if not k.startswith("MEMWARDEN_")}
    env.pop("DYNO", None)
    env.update(REDIS_URL=args.redis, MW_DONE=DONE)
    if name == "ps-after-each-job":
        env["SIDEKIQ_MEMORY_KILLER_MAX_RSS"] = str(int(0.85 * args.limit) // 1024)
        env["SIDEKIQ_MEMORY_KILLER_GRACE_TIME_IN_SECONDS"] = str(args.middleware_grace)
        return sidekiq, env
    run = [sys.executable, "-c", "from memwarden.cli import main; main()", "run"]
    run += ["--no-status", "--journal", journal]
    if name == "memwarden-run":
        run += ["--drain-signal", "TSTP"]
    return [*run, "--", *sidekiq], env


def contender(name: str, workdir: str, args: argparse.Namespace) -> Result:
    import redis

    conn: Any = redis.Redis.from_url(args.redis)
    conn.flushdb()
    journal = os.path.join(workdir, f"{name}.journal.jsonl")
    restart_file = os.path.join(workdir, f"{name}.restart")
    argv, env = command(name, args, journal)
    env["MEMORY_KILLER_RESTART_FILE"] = restart_file
    try:
        enqueue(conn, args.jobs, args.mb)
        with (
            dyno(args.limit) as cg,
            open(os.path.join(workdir, f"{name}.log"), "ab") as log,
            Sampler(cg, over=args.limit) as sampler,
        ):
            platform = Platform(argv, env, cg, log, restart_file)
            platform.start()
            try:
                took = wait_done(conn, args.jobs, args.timeout)
            finally:
                platform.stop()
            oom_kills = cg.oom_kills()
        counts = {int(k): int(v) for k, v in conn.hgetall(DONE).items()}
        failed = int(conn.get("stat:failed") or 0)  # a job (or a middleware) raised
    finally:
        conn.flushdb()
        conn.close()
    if name == "ps-after-each-job":
        restarts, hard_kills, lifetimes = platform.restarts, platform.hard_kills, platform.starts
    else:
        restarts, hard_kills, lifetimes = journal_counts(journal)
    return Result(
        name=name,
        jobs_per_s=len(counts) / took if took > 0 else 0.0,
        lost=args.jobs - len(counts),
        oom_kills=oom_kills,
        over_limit_s=sampler.over_limit_s,
        peak_bytes=sampler.peak,
        restarts=restarts,
        extra={
            "hard_kills": hard_kills,
            "duplicates": sum(n - 1 for n in counts.values()),
            "failed": failed,
            "lifetimes": lifetimes,
        },
        series=sampler.points,
    )


def line(r: Result) -> str:
    """The contender's last line: the issue's keys first, in its order."""
    head = (
        f"contender={r.name} jobs_per_s={r.jobs_per_s:.2f} lost={r.lost} "
        f"oom_kills={r.oom_kills} restarts={r.restarts}"
    )
    tail = " ".join(f"{k}={v}" for k, v in r.extra.items())
    return f"{head} {tail} peak_bytes={r.peak_bytes}"


def report(results: list[Result], args: argparse.Namespace, argv: list[str]) -> str:
    return "\n".join(
        [
            f"{args.jobs} Sidekiq jobs keeping {args.mb} MB each, -c {args.concurrency}, "
            f"a {format_size(args.limit)} memory cgroup per contender; the MemoryKiller "
            f"middleware's grace {args.middleware_grace} s.",
            "",
            table(results, COLUMNS),
            "",
            f"One run: `{shlex.join(['python', 'bench/sidekiq.py', *argv[1:]])}`.",
            f"Machine: {machine()}.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--mb", type=int, default=8, help="MB each job keeps")
    p.add_argument("--concurrency", type=int, default=5)
    p.add_argument("--limit", default="512MiB", help="the memory cgroup's limit")
    p.add_argument("--middleware-grace", type=int, default=120, help="the middleware's grace (s)")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/14", help="emptied before/after")
    p.add_argument("--timeout", type=float, default=900.0, help="per contender (s)")
    p.add_argument("--contenders", default=",".join(ORDER))
    p.add_argument("--tiny", action="store_true", help="60 jobs: a quick look")
    p.add_argument("--doc", help="write the figures into this page's bench:sidekiq block")
    args = p.parse_args(argv[1:])
    args.limit = parse_size(args.limit)
    if args.tiny:
        args.jobs = min(args.jobs, 60)
    missing = None if shutil.which("sidekiq") else "sidekiq not installed (ruby-sidekiq)"
    names, skipped = choose(p, args.contenders, ORDER, {name: missing for name in ORDER})
    for name, why in skipped.items():
        print(f"# {name} skipped: {why}", file=sys.stderr)
    results = run_each(names, lambda name, workdir: contender(name, workdir, args))
    text = report(results, args, argv)
    print(text)
    lines = "\n".join(line(r) for r in results)
    if args.doc:
        replace_block(args.doc, "sidekiq", f"{text}\n\n```\n{lines}\n```")
    print()
    print(lines)


if __name__ == "__main__":
    main()
