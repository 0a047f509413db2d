"""Gunicorn under a leaking endpoint: no guard, ``max_requests`` + jitter, memwarden.

Each contender is a real Gunicorn (``--workers 3``) in a fresh memory cgroup with the same
limit, loaded by the same real HTTP clients (a new connection per request, ``/leak`` keeping
``--leak`` per request every second request) for ``--duration`` seconds:

- ``none``: Gunicorn alone; the kernel's OOM killer is the guard.
- ``max-requests``: ``--max-requests M --max-requests-jitter M/4`` with ``M`` tuned so the
  workers together stay under the same soft limit memwarden uses (85% of the limit), from
  the idle server's memory measured first: the best a request count can do knowing the leak.
- ``memwarden``: ``memwarden.gunicorn.hooks()`` with its defaults.

Figures: requests served and failed (refused, reset, cut short, non-200), worker restarts
(new worker pids), OOM kills, peak working set, p99 latency overall and of the requests that
started within 1 s of a change of workers. Run::

    .venv/bin/python bench/gunicorn_recycling.py --out docs

``--out docs`` writes ``docs/bench-gunicorn.md`` and ``.png`` and the tables of
``docs/benchmarks.md`` and ``docs/gunicorn.md``; ``--tiny`` runs a few seconds per contender
(the test's mode). A leak that changed since ``max_requests`` was tuned (the second table of
``docs/gunicorn.md``)::

    .venv/bin/python bench/gunicorn_recycling.py --leak 2MiB --tuned-for 1MiB \
        --contenders max-requests,memwarden --out docs

Uvicorn's worker class (its own table in ``docs/gunicorn.md``)::

    .venv/bin/python bench/gunicorn_recycling.py --worker-class uvicorn_worker.UvicornWorker \
        --out docs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from _harness import APPS, Result, Sampler, bench_env, dyno, machine, publish, replace_block, table
from memwarden.units import format_size, parse_size

sys.path.insert(0, APPS)
from web_load import Load, free_port, gunicorn, summary
from web_load import Sampler as Workers

ORDER = ("none", "max-requests", "memwarden")
SOFT_SHARE = 0.85  # memwarden's default soft limit under a kernel-enforced quota
COLUMNS = [
    ("served", "served"),
    ("req/s", "jobs_per_s"),
    ("failed", "lost"),
    ("worker restarts", "restarts"),
    ("OOM kills", "oom_kills"),
    ("peak", "peak_bytes"),
    ("p99 ms", "p99_ms"),
    ("p99 ms in recycles", "p99_recycle_ms"),
]


def idle_memory(args: argparse.Namespace, limit: int) -> int:
    """The working set of an idle server that answered a few requests: what the workers
    start from."""
    with dyno(limit) as cg:
        port = free_port()
        with gunicorn(cg.join, port, worker_class=args.worker_class, guard=False, env=env(args)):
            load = Load(port, clients=1, leak_every=10**9).start()
            time.sleep(1.0)
            load.stop()
            time.sleep(0.5)
            return cg.working_set()


def env(args: argparse.Namespace, **extra: str) -> dict[str, str]:
    return {**bench_env(LEAK_BYTES=str(parse_size(args.leak, "--leak"))), **extra}


def run(name: str, args: argparse.Namespace, limit: int, extra: list[str]) -> Result:
    with dyno(limit) as cg, tempfile.TemporaryDirectory(prefix="memwarden-bench-") as tmp:
        port = free_port()
        guard = name == "memwarden"
        settings = {
            "MEMWARDEN_JOURNAL": os.path.join(tmp, "journal.jsonl"),
            "MEMWARDEN_STATE_DIR": os.path.join(tmp, "state"),
        }
        with gunicorn(
            cg.join,
            port,
            worker_class=args.worker_class,
            guard=guard,
            extra=extra,
            env=env(args, **settings),
            workers=args.workers,
        ) as arbiter:
            workers = Workers(cg.cgroup, arbiter.pid).start()
            with Sampler(cg, over=int(limit * SOFT_SHARE)) as memory:
                load = Load(port, clients=args.clients, pause=args.pause).start()
                t0 = time.monotonic()
                time.sleep(args.duration)
                load.stop()
                seconds = time.monotonic() - t0
            workers.stop()
        figures = summary(load, workers, seconds)
        return Result(
            name=name,
            jobs_per_s=figures["rps"],
            lost=figures["failed"],
            oom_kills=cg.oom_kills(),
            over_limit_s=memory.over_limit_s,
            peak_bytes=memory.peak,
            restarts=figures["restarts"],
            extra={
                "served": figures["served"],
                "p99_ms": figures["p99_ms"],
                "p99_recycle_ms": figures["p99_recycle_ms"],
                "max_requests": int(extra[1]) if extra else 0,
            },
            series=memory.points,
        )


def max_requests(args: argparse.Namespace, limit: int) -> int:
    """Requests per worker that keep every worker's leak under the soft limit together,
    jitter (a quarter more) included."""
    idle = idle_memory(args, limit)
    leak = parse_size(args.tuned_for or args.leak, "--tuned-for") or 1
    per_worker = (int(limit * SOFT_SHARE) - idle) / args.workers
    # Every second request leaks; M + M/4 requests at most per worker.
    return max(2, int(per_worker / (leak / 2) / 1.25))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contenders", default=",".join(ORDER), help="comma-separated subset")
    p.add_argument("--limit", default="384MiB", help="the cgroup limit")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per contender")
    p.add_argument("--leak", default="1MiB", help="kept per /leak request")
    p.add_argument("--tuned-for", help="the leak max_requests is tuned for (default: --leak)")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--pause", type=float, default=0.05, help="seconds between a client's requests")
    p.add_argument("--worker-class", default="sync")
    p.add_argument("--tiny", action="store_true", help="a few seconds each: the test's mode")
    p.add_argument("--out", help="write bench-gunicorn.md and .png into this directory")
    args = p.parse_args()
    if args.tiny:
        args.duration, args.limit = 6.0, "256MiB"
    limit = parse_size(args.limit, "--limit")
    assert limit is not None
    names = [n for n in ORDER if n in args.contenders.split(",")]
    results = []
    for name in names:
        extra: list[str] = []
        if name == "max-requests":
            m = max_requests(args, limit)
            extra = ["--max-requests", str(m), "--max-requests-jitter", str(max(1, m // 4))]
        results.append(run(name, args, limit, extra))
    text = "\n".join(
        [
            f"Gunicorn `{args.worker_class}`, {args.workers} workers, cgroup limit "
            f"{format_size(limit)}, {args.clients} clients, `/leak` keeping {args.leak} on every "
            f"second request, {args.duration:g} s per contender"
            + (f"; max_requests tuned for {args.tuned_for}" if args.tuned_for else "")
            + ".",
            "",
            table(results, COLUMNS),
            "",
            f"One run. Machine: {machine()}.",
        ]
    )
    hard = int(limit * 0.95)
    title = f"Gunicorn, leaking endpoint, cgroup limit {format_size(limit)}"
    block = "gunicorn-changed" if args.tuned_for else None
    if args.worker_class != "sync":  # another worker class: its own table in the page
        block = f"gunicorn-{args.worker_class.rsplit('.', 1)[-1].lower()}"
    if block:  # a second table, beside the first: printed, and in the page with --out
        print(text)
        if args.out:
            replace_block(os.path.join(args.out, "gunicorn.md"), block, text)
        print()
        for r in results:
            print(r.line())
        return
    if args.out:  # the page's own copy of the table
        replace_block(os.path.join(args.out, "gunicorn.md"), "gunicorn", text)
    publish("gunicorn", text, results, (limit, hard), title, args.out, None, "")


if __name__ == "__main__":
    main()
