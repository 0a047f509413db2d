"""Quota adherence, throughput and reclaim: five ways to run one Celery worker, side by side.

Each contender runs the same Celery worker (prefork, concurrency 2, real Redis broker, the app
in ``bench/apps/bench_celery.py``) on the same fixed job mix, inside a fresh memory cgroup
with the same limit: the kernel's OOM killer is the judge. A worker that exits is started
again, as a dyno or pod would be. Contenders:

- ``none``: no guard;
- ``celery-max-mem``: Celery's own ``--max-memory-per-child``, set to the guard's per-child
  share (``--child-share``; by default the share the guard gives itself, measured from a
  worker started first: (soft limit − the worker before its pool forks) / concurrency);
  Celery checks a child's peak RSS (``ru_maxrss``) after a task, the guard its USS now;
- ``memwarden-run``: ``memwarden run`` around the worker (restarts from outside);
- ``guard-noreclaim`` / ``guard-reclaim``: ``memwarden.celery.guard(app)`` with reclaim
  off / on.

Usage::

    python bench/quota.py                       # every contender available, ~1 min each
    python bench/quota.py --out docs/           # also docs/bench-quota.md and .png
    python bench/quota.py --jobs 30 --contenders none,guard-reclaim   # a quick look

Prints a table, then last one line per contender:
``contender=<name> jobs_per_s=<float> lost=<int> oom_kills=<int> over_limit_s=<float>
peak_bytes=<int> restarts=<int> ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis
from celery import Celery

from _harness import (
    Result,
    Sampler,
    bench_env,
    choose,
    dyno,
    headline,
    machine,
    publish,
    run_each,
    runs_note,
    share,
    stop,
    table,
)
from memwarden.integrations.celery import default_child_share
from memwarden.units import format_size, parse_size

REDIS = "redis://127.0.0.1:6379/9"  # this bench's own Redis DB
CONCURRENCY = 2
ORDER = ("none", "celery-max-mem", "memwarden-run", "guard-noreclaim", "guard-reclaim")
COLUMNS = [
    ("jobs/s", "jobs_per_s"),
    ("lost", "lost"),
    ("OOM kills", "oom_kills"),
    ("s over hard limit", "over_limit_s"),
    ("peak", "peak_bytes"),
    ("processes replaced", "restarts"),
    ("worker restarts", "worker_restarts"),
    ("recycles", "recycles"),
    ("guard kills", "guard_kills"),
    ("reclaims", "reclaims"),
    ("freed", "freed"),
    ("duplicates", "duplicates"),
    ("major faults", "major_faults"),
]
HEADLINE = [
    ("jobs/s", "jobs_per_s"),
    ("lost", "lost"),
    ("OOM kills", "oom_kills"),
    ("s over hard limit", "over_limit_s"),
    ("processes replaced", "restarts"),
    ("guard kills", "guard_kills"),
    ("reclaims", "reclaims"),
]


@dataclass(frozen=True)
class Settings:
    limit: int
    jobs: int
    grow_mb: int
    frag_mb: tuple[int, int]
    grace: float
    interval: float | None  # None: memwarden's default
    stall: float
    seed: int
    #: Each pool child's share, ``MEMWARDEN_CHILD_LIMIT`` (None: the guard's default)...
    child_share: int | None
    #: ...and Celery's ``--max-memory-per-child`` (the same share, measured when None above).
    celery_share: int = 0

    @property
    def soft(self) -> int:
        return int(self.limit * 0.85)

    @property
    def hard(self) -> int:
        return int(self.limit * 0.95)


def job_mix(s: Settings) -> list[tuple[str, int, int]]:
    """The fixed mix: (kind, MiB, seed). Same for every contender."""
    rnd = random.Random(s.seed)
    mix = []
    for i in range(s.jobs):
        roll = rnd.random()
        if roll < 0.03:
            mix.append(("grow", s.grow_mb, i))
        elif roll < 0.45:
            mix.append(("fragment", rnd.randint(*s.frag_mb), i))
        else:
            mix.append(("light", 0, i))
    return mix


def available() -> dict[str, str | None]:
    """Contender -> None when it can run here, else why not."""
    from memwarden.cli import COMMANDS

    why_guard = None if _spec_ok("memwarden.celery") else "memwarden.celery is not in this tree"
    return {
        "none": None,
        "celery-max-mem": None,
        "memwarden-run": None if "run" in COMMANDS else "`memwarden run` is not in this tree",
        "guard-noreclaim": why_guard,
        "guard-reclaim": why_guard,
    }


def _spec_ok(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def worker_command(name: str, s: Settings, journal: str) -> list[str]:
    celery = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "bench_celery",
        "worker",
        "-P",
        "prefork",
        "-c",
        str(CONCURRENCY),
        "--loglevel",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if name == "celery-max-mem":
        per_child_kib = s.celery_share // 1024
        celery.append(f"--max-memory-per-child={per_child_kib}")
    if name == "memwarden-run":
        return [
            sys.executable,
            "-m",
            "memwarden.cli",
            "run",
            "--soft-limit",
            f"{s.soft}B",
            "--hard-limit",
            f"{s.hard}B",
            "--grace",
            f"{s.grace:g}",
            *(["--interval", f"{s.interval:g}"] if s.interval is not None else []),
            "--journal",
            journal,
            "--",
            *celery,
        ]
    return celery


def contender_env(name: str, s: Settings, prefix: str, journal: str, state: str) -> dict[str, str]:
    env = {k: v for k, v in bench_env().items() if not k.startswith("MEMWARDEN_")}
    env.update(BENCH_REDIS=REDIS, BENCH_PREFIX=prefix, BENCH_GUARD="")
    if name.startswith("guard-"):
        env["BENCH_GUARD"] = "reclaim" if name == "guard-reclaim" else "noreclaim"
    if name.startswith(("guard-", "memwarden-")):
        env.update(
            MEMWARDEN_SOFT_LIMIT=f"{s.soft}B",
            MEMWARDEN_HARD_LIMIT=f"{s.hard}B",
            MEMWARDEN_GRACE=f"{s.grace:g}",
            MEMWARDEN_MIN_UPTIME="0",
            MEMWARDEN_MAX_RESTARTS="1000",
            MEMWARDEN_JOURNAL=journal,
            MEMWARDEN_STATE_DIR=state,
        )
        if s.interval is not None:
            env["MEMWARDEN_INTERVAL"] = f"{s.interval:g}"
        if s.child_share is not None:
            env["MEMWARDEN_CHILD_LIMIT"] = f"{s.child_share}B"
    return env


def journal_totals(path: str) -> dict[str, int]:
    """From a memwarden journal (and its rotated files): reclaims, bytes freed, hard kills
    and, of those, kills of one pool child (the pool forks a new one: not a recycle)."""
    totals = dict.fromkeys(("reclaims", "freed", "kills", "child_kills"), 0)
    for p in [path, *(f"{path}.{i}" for i in range(1, 4))]:
        with contextlib.suppress(OSError), open(p) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("dry_run"):
                    continue
                if rec.get("event") == "reclaim":
                    totals["reclaims"] += 1
                    totals["freed"] += int(rec.get("freed") or 0)
                if rec.get("event") == "kill":
                    totals["kills"] += 1
                    totals["child_kills"] += rec.get("target") == "child"
    return totals


def forget_run(r: redis.Redis, prefix: str, ids: list[str]) -> None:
    """Delete this run's keys: ours, kombu's binding, its messages held in kombu's ``unacked``
    hash (from workers killed mid-task) and the guard's poison counts of our task ids."""
    keys = [*r.scan_iter(f"{prefix}*"), *r.scan_iter(f"_kombu.binding.{prefix}*")]
    keys += [f"memwarden:kills:{task_id}" for task_id in ids]
    r.delete(*keys)
    for tag, payload in r.hscan_iter("unacked"):
        if prefix.encode() in payload:
            r.hdel("unacked", tag)
            r.zrem("unacked_index", tag)


def guard_share(s: Settings, workdir: str) -> int:
    """The share the guard gives each pool child by default, for ``celery-max-mem``: a worker
    is started in a dyno until it records what it holds before its pool forks."""
    prefix = f"memwarden-bench:{uuid.uuid4().hex[:10]}"
    journal = os.path.join(workdir, "probe.jsonl")
    env = contender_env("none", s, prefix, journal, os.path.join(workdir, "probe-state"))
    r = redis.Redis.from_url(REDIS)
    try:
        with dyno(s.limit) as cg, open(os.path.join(workdir, "workers.log"), "ab") as log:
            proc = cg.spawn(worker_command("none", s, journal), env, log)
            deadline = time.monotonic() + 90
            while (base := r.get(f"{prefix}:base")) is None and proc.poll() is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            stop(proc)
    finally:
        forget_run(r, prefix, [])
        r.close()
    if base is None:
        raise SystemExit("bench: the probe worker did not record its size in 90 s")
    return default_child_share(s.soft, int(base), CONCURRENCY)


def run_contender(name: str, s: Settings, workdir: str, log: Any) -> Result:
    run_id = uuid.uuid4().hex[:10]
    prefix = f"memwarden-bench:{run_id}"
    r = redis.Redis.from_url(REDIS)
    journal = os.path.join(workdir, f"{name}-{run_id}.jsonl")  # one per round
    state = os.path.join(workdir, f"{name}-{run_id}-state")
    env = contender_env(name, s, prefix, journal, state)
    cmd = worker_command(name, s, journal)
    sender = Celery("bench-sender", broker=REDIS)
    mix = job_mix(s)
    ids = [f"{i:05d}-{kind}-{uuid.uuid4().hex[:6]}" for i, (kind, _, _) in enumerate(mix)]
    platform_restarts = 0
    try:
        with dyno(s.limit) as cg, Sampler(cg, over=s.hard) as sampler:

            def start() -> subprocess.Popen[bytes]:
                return cg.spawn(cmd, env, log)

            proc = start()
            deadline = time.monotonic() + 90
            while not r.get(f"{prefix}:ready"):
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: {name}: the worker did not get ready in 90 s")
                if proc.poll() is not None:
                    proc = start()
                time.sleep(0.1)
            t0 = time.time()
            for task_id, (kind, mb, seed) in zip(ids, mix, strict=True):
                sender.send_task(
                    "bench.job", args=[kind, mb, seed], task_id=task_id, queue=f"{prefix}:queue"
                )
            done, progress_at = 0, time.monotonic()
            while done < len(ids):
                if proc.poll() is not None:  # the platform starts an exited worker again
                    platform_restarts += 1
                    proc = start()
                now_done = int(r.scard(f"{prefix}:done"))
                if now_done != done:
                    done, progress_at = now_done, time.monotonic()
                elif time.monotonic() - progress_at > s.stall:
                    break
                time.sleep(0.2)
            stop(proc)
            oom_kills = cg.oom_kills()
            major_faults = cg.major_faults()
        last = float(r.get(f"{prefix}:last") or t0)
        completions = int(r.get(f"{prefix}:completions") or 0)
        workers = int(r.get(f"{prefix}:workers") or 1)
        children = int(r.get(f"{prefix}:children") or 0)
    finally:
        forget_run(r, prefix, ids)
        r.close()
    totals = journal_totals(journal)
    worker_restarts = max(0, workers - 1)
    # Every pool child beyond the first of each worker replaced one that left: recycled,
    # OOM-killed or killed by the guard. All of them count as restarts, as a worker killed
    # and started again does (memwarden-run): a kill is the dearest restart, not none.
    replaced = max(0, children - CONCURRENCY * workers)
    recycles = max(0, replaced - oom_kills - totals["child_kills"])
    return Result(
        name=name,
        jobs_per_s=done / max(1e-3, last - t0),
        lost=len(ids) - done,
        oom_kills=oom_kills,
        over_limit_s=sampler.over_limit_s,
        peak_bytes=sampler.peak,
        restarts=worker_restarts + replaced,
        extra={
            "worker_restarts": worker_restarts,
            "recycles": recycles,
            "guard_kills": totals["kills"],
            "reclaims": totals["reclaims"],
            "freed": totals["freed"],
            "duplicates": completions - done,
            "major_faults": major_faults,
            "jobs": len(ids),
            "platform_restarts": platform_restarts,
        },
        series=sampler.points,
    )


def report(results: list[Result], s: Settings, skipped: dict[str, str], argv: list[str]) -> str:
    base = next((r for r in results if r.name == "none"), None)
    lines = [
        f"Limit {format_size(s.limit)} (cgroup, no swap); soft {format_size(s.soft)}, "
        f"hard {format_size(s.hard)}; {s.jobs} jobs; Celery prefork -c {CONCURRENCY}, "
        f"Redis broker.",
        "Pool child share: "
        + (
            f"{format_size(s.child_share)} (`--child-share`)"
            if s.child_share is not None
            else "the guard's own default"
        )
        + (
            f"; celery-max-mem: `--max-memory-per-child` {format_size(s.celery_share)}."
            if s.celery_share
            else "."
        ),
        f"Machine: {machine()}.",
        f"Command: `python bench/quota.py {' '.join(argv)}`",
        "",
        table(results, COLUMNS),
        "",
        runs_note(results),
    ]
    if base is not None and base.jobs_per_s > 0:
        lines.append("")
        for r in results:
            per_round = ""
            if len(r.rounds) > 1 and len(r.rounds) == len(base.rounds):
                pairs = list(zip(r.rounds, base.rounds, strict=True))
                ratios = ", ".join(
                    f"{100 * a.jobs_per_s / b.jobs_per_s:.0f}%" for a, b in pairs if b.jobs_per_s
                )
                rates = ", ".join(f"{a.jobs_per_s:.1f}" for a, _ in pairs)
                per_round = f" (rounds: {ratios}; jobs/s {rates})"
            pct = 100 * share(r, base)
            lines.append(f"- {r.name}: throughput {pct:.0f}% of no guard{per_round}")
    for name, why in skipped.items():
        lines.append(f"- {name}: not run ({why})")
    goal = next((r for r in results if r.name == "guard-reclaim"), None)
    if goal is not None:
        lines += ["", goal_verdict(goal, base, results)]
    return "\n".join(lines)


def goal_verdict(goal: Result, base: Result | None, results: list[Result]) -> str:
    noreclaim = next((r for r in results if r.name == "guard-noreclaim"), None)
    checks = [
        ("0 lost", goal.lost == 0),
        ("0 OOM kills", goal.oom_kills == 0),
        ("0 s over the hard limit", goal.over_limit_s == 0),
    ]
    if base is not None and base.jobs_per_s > 0:
        checks.append(("throughput >= 95% of no guard", share(goal, base) >= 0.95))
    if noreclaim is not None:
        checks.append(
            ("fewer processes replaced than without reclaim", goal.restarts < noreclaim.restarts)
        )
    over = " over all rounds" if len(goal.rounds) > 1 else ""
    return f"Goal (guard-reclaim{over}): " + "; ".join(
        f"{what}: {'met' if ok else 'NOT met'}" for what, ok in checks
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contenders", default=",".join(ORDER), help="comma-separated subset")
    p.add_argument("--limit", default="512MiB", help="the cgroup limit (the quota)")
    p.add_argument("--jobs", type=int, default=600)
    p.add_argument("--grow-mb", type=int, default=112, help="how far a grow job grows")
    p.add_argument("--frag-mb", default="40-160", help="fragment job sizes, MiB (min-max)")
    p.add_argument("--grace", type=float, default=5.0, help="memwarden grace, seconds")
    p.add_argument(
        "--interval", type=float, default=None, help="watchdog interval (default: memwarden's)"
    )
    p.add_argument("--stall", type=float, default=30.0, help="end after so long with no job done")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every contender this many times, in turn (jobs/s: the median round)",
    )
    p.add_argument(
        "--child-share",
        type=float,
        help="per-child limit as a part of the limit (default: the guard's own share)",
    )
    p.add_argument("--out", help="write bench-quota.md and bench-quota.png into this directory")
    p.add_argument("--readme", help="put the headline table into this file's marked block")
    a = p.parse_args(argv)
    low, _, high = a.frag_mb.partition("-")
    s = Settings(
        limit=parse_size(a.limit, "--limit"),
        jobs=a.jobs,
        grow_mb=a.grow_mb,
        frag_mb=(int(low), int(high or low)),
        grace=a.grace,
        interval=a.interval,
        stall=a.stall,
        seed=a.seed,
        child_share=None if a.child_share is None else int(parse_size(a.limit) * a.child_share),
    )
    names, skipped = choose(p, a.contenders, ORDER, available())

    def run(name: str, workdir: str) -> Result:
        nonlocal s
        if name == "celery-max-mem" and not s.celery_share:
            share = s.child_share or guard_share(s, workdir)
            s = dataclasses.replace(s, celery_share=share)
        with open(os.path.join(workdir, "workers.log"), "ab") as log:
            return run_contender(name, s, workdir, log)

    if a.rounds < 1:
        p.error(f"--rounds must be at least 1, e.g. --rounds 3 (got {a.rounds})")
    results = run_each(names, run, a.rounds)
    text = report(results, s, skipped, argv)
    verdict = next((line for line in text.splitlines() if line.startswith("Goal")), "")
    publish(
        "quota",
        text,
        results,
        (s.limit, s.hard),
        "Celery worker memory (cgroup working set) per contender",
        a.out,
        a.readme,
        headline(results, HEADLINE) + "\n\n" + verdict,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
