"""``memwarden demo``: a real worker outgrows a small limit, and memwarden handles it.

No external service. The demo process supervises (``memwarden run``'s
:class:`~memwarden.supervisor.run.Supervisor`) a worker child that takes jobs from a file
queue and runs them under an in-process :class:`~memwarden.warden.Warden` with the exit
restart. Some jobs fragment the heap for real (several threads allocating mixed sizes and
keeping a sliver: glibc's arena stair-step), some leak a little, the rest are small.
Over the soft limit the warden first reclaims (``gc`` + ``malloc_trim``); when that is not
enough for ``grace``, it drains the worker (the job in hand finishes, no new one starts)
and exits 75, and the supervisor starts a fresh worker that goes on with the queue. The
summary is computed from the journal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import click

from memwarden.journal import Journal, read_records
from memwarden.units import format_size

SOFT = "100MiB"
HARD = "200MiB"
JOBS = 90
BUDGET = 45.0  # seconds: the demo stops there whatever happened
PACE = 0.2  # seconds between jobs, so a person can follow
DEFAULT_JOURNAL = "memwarden-journal-demo.jsonl"
#: The job mix, in queue order: (kind, what it does).
KINDS = (
    ("resize_image", "fragments the heap: 4 threads, 64 MiB of mixed sizes, keeps 1/20"),
    ("send_email", "small"),
    ("build_report", "keeps 4 MiB for good (a leak)"),
    ("send_email", "small"),
    ("export_csv", "builds a 2 MiB CSV in memory, then drops it"),
)
MiB = 1024 * 1024


# --------------------------------------------------------------------- the worker
class FileQueue:
    """Jobs 0..total-1; ``ack`` records a finished job, so a new worker goes on from there."""

    def __init__(self, path: str, total: int) -> None:
        self.path = path
        self.total = total

    def done(self) -> int:
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def next(self) -> int | None:
        n = self.done()
        return n if n < self.total else None

    def ack(self, n: int) -> None:
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(str(n + 1))
        os.replace(tmp, self.path)


def run_job(kind: str, n: int) -> None:
    from memwarden import workload

    if kind == "resize_image":
        workload.fragment(mb=64, threads=4, keep_every=20, seed=n)
    elif kind == "build_report":
        workload.leak(4)
    elif kind == "export_csv":
        csv = "\n".join(f"{i},{i * i},row {i}" for i in range(100_000))
        del csv
    else:
        _ = [str(i) for i in range(2000)]


def bar(value: int, limit: int, width: int = 24) -> str:
    filled = min(width, round(width * value / limit)) if limit else 0
    return "[" + "#" * filled + "." * (width - filled) + "]" + (" OVER" if value >= limit else "")


def worker(state: str, journal: str, total: int) -> int:
    """The worker child: jobs from the queue under an in-process warden (restart=exit)."""
    from memwarden.gauges.proc import self_rss
    from memwarden.hooks import Hooks
    from memwarden.units import parse_size
    from memwarden.warden import Warden

    logging.basicConfig(level=logging.INFO, format="    %(message)s", stream=sys.stdout)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    warden = Warden(
        hooks=Hooks(drain=stop.set),
        env={},
        soft_limit=SOFT,
        hard_limit=HARD,
        grace=2.0,
        min_uptime=1.0,
        max_restarts=50,
        interval=0.5,
        measure="process",
        restart="exit",
        journal=journal,
        state_dir=state,
    )
    soft = parse_size(SOFT)
    queue = FileQueue(os.path.join(state, "queue"), total)
    print(f"  worker {os.getpid()} up, RSS {format_size(self_rss())}", flush=True)
    warden.start()
    while not stop.is_set():
        n = queue.next()
        if n is None:
            stop.wait(0.2)
            continue
        kind = KINDS[n % len(KINDS)][0]
        with warden.job(kind, n):
            run_job(kind, n)
            queue.ack(n)
            rss = self_rss()  # shown before the warden's after-job check acts on it
            print(
                f"  job {n:3d} {kind:<13} RSS {format_size(rss):>10} {bar(rss, soft)}", flush=True
            )
        stop.wait(PACE)
    warden.stop()
    if warden.state.restarting:
        time.sleep(60)  # the warden's restart thread ends this process (exit 75)
    return 0


# --------------------------------------------------------------------- the summary
@dataclass(frozen=True)
class Summary:
    jobs: int
    unique_jobs: int
    lifetimes: int
    restarts: int
    kills: int
    reclaims: int
    freed: int
    peak: int
    soft: int | None
    hard: int | None

    @property
    def each_once(self) -> bool:
        return self.jobs == self.unique_jobs


def summarize(records: Iterable[dict[str, Any]]) -> Summary:
    """The demo's figures from journal records (any journal of one run will do)."""
    recs = list(records)
    jobs = [r for r in recs if r["event"] == "job"]
    samples = [r for r in recs if r["event"] == "sample"]
    reclaims = [r for r in recs if r["event"] == "reclaim" and not r.get("dry_run")]
    peaks = [int(r.get("total", r.get("rss", 0))) for r in samples]
    peaks += [int(r["rss_after"]) for r in jobs if "rss_after" in r]
    soft = next((r.get("limit") for r in reversed(samples) if r.get("limit")), None)
    hard = next((r.get("hard") for r in reversed(samples) if r.get("hard")), None)
    return Summary(
        jobs=len(jobs),
        unique_jobs=len({r.get("job_id") for r in jobs}),
        lifetimes=len({r["pid"] for r in jobs}),
        restarts=sum(1 for r in recs if r["event"] == "restart" and not r.get("dry_run")),
        kills=sum(1 for r in recs if r["event"] == "kill" and not r.get("dry_run")),
        reclaims=len(reclaims),
        freed=sum(int(r.get("freed", 0)) for r in reclaims),
        peak=max(peaks, default=0),
        soft=soft,
        hard=hard,
    )


def summary_text(s: Summary, journal: str, seconds: float, left: int) -> str:
    """The demo's closing summary from its journal: jobs, reclaims, restarts, kills, peak."""
    once = "every job ran exactly once" if s.each_once else "SOME JOBS RAN TWICE"
    lines = [
        "",
        f"memwarden demo: done in {seconds:.1f}s (figures from the journal)",
        f"  jobs done     {s.jobs} in {s.lifetimes} worker lifetimes ({once})"
        + (f", {left} left when the time budget ran out" if left else ""),
        f"  reclaims      {s.reclaims}, freed {format_size(s.freed)} (gc + malloc_trim)",
        f"  restarts      {s.restarts} (drained first: the job in hand finished, then exit 75)",
        f"  hard kills    {s.kills}",
        f"  peak memory   {format_size(s.peak)} vs soft limit {format_size(s.soft)}, "
        f"hard {format_size(s.hard)}",
        f"  journal       {journal}",
        "",
        f"next: memwarden diagnose {journal}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------- the command
def _journal_path(given: str | None) -> str:
    if given:
        return os.path.abspath(given)
    here = os.path.abspath(DEFAULT_JOURNAL)
    if os.access(os.path.dirname(here), os.W_OK):
        return here
    return os.path.join(tempfile.gettempdir(), DEFAULT_JOURNAL)


@click.command()
@click.option(
    "--journal",
    default=None,
    metavar="FILE",
    help=f"Journal file (default: ./{DEFAULT_JOURNAL}, else in the temp dir).",
)
@click.option("--jobs", default=JOBS, metavar="N", help=f"Jobs in the queue (default: {JOBS}).")
@click.option(
    "--seconds",
    default=BUDGET,
    metavar="SECONDS",
    help=f"Time budget in seconds: the demo stops there (default: {BUDGET:g}).",
)
def demo(journal: str | None, jobs: int, seconds: float) -> None:
    """See memwarden work in under a minute: a real worker outgrows a small limit."""
    from memwarden.supervisor.run import Supervisor, settings

    path = _journal_path(journal)
    if journal is None:
        for old in [path] + [f"{path}.{n}" for n in range(1, 4)]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(old)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter("  %(message)s"))
    state = tempfile.mkdtemp(prefix="memwarden-demo-")
    queue = FileQueue(os.path.join(state, "queue"), jobs)
    click.echo(
        f"memwarden demo: one worker, {jobs} jobs, soft limit {SOFT}, hard limit {HARD}.\n"
        "  Jobs: "
        + "; ".join(f"{kind} {what}" for kind, what in dict(KINDS).items())
        + ".\n  Over the soft limit the warden reclaims first; if memory stays over for 2s,\n"
        "  it drains the worker and exits 75, and the supervisor starts a fresh one.\n"
    )
    start = time.monotonic()
    t0 = time.time()
    run = settings(
        {},
        hard_limit="300MiB",
        measure="tree",
        interval="0.5",
        min_uptime="1",
        shutdown_timeout="10",
        max_early_exits=3,
    )
    supervisor = Supervisor(
        [sys.executable, "-m", "memwarden.cli.demo", state, path, str(jobs)],
        run,
        journal=Journal(path),
        status=False,
        journal_samples=False,
        until=lambda: queue.next() is None or time.monotonic() - start > seconds,
        name="worker",
    )
    try:
        status = supervisor.run()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    with open(path) as f:
        records, _ = read_records(f)
    summary = summarize(r for r in records if r.get("ts", 0) >= t0)
    left = max(0, jobs - summary.unique_jobs)
    click.echo(summary_text(summary, path, time.monotonic() - start, left))
    # Asked to stop at the time budget while draining, a worker leaves with its restart's
    # status (75): a clean end too (a slow machine, e.g. the cgroup v2 VM of the tests).
    if status not in (0, run.config.exit_code, 128 + signal.SIGTERM):
        click.echo(f"memwarden demo: the worker ended with status {status}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], sys.argv[2], int(sys.argv[3])))
