"""Record labelled journals from real Python workloads, for ``tests/test_diagnose.py``.

Each scenario runs real job kinds (``memwarden.workload``: a real leak, real multi-threaded
glibc fragmentation, a cache that fills and stops, big allocations that are freed) in fresh
worker processes, each with a real ``Warden`` writing a journal. The label is what the
workload *is* (the expected pattern and the kind to blame), not what diagnose says.

    .venv/bin/python scripts/record_traces.py            # all scenarios -> tests/data/traces
    .venv/bin/python scripts/record_traces.py leak mixed  # some of them
    .venv/bin/python scripts/record_traces.py --out /tmp/traces  # elsewhere

A journal is gzipped JSONL (``memwarden diagnose`` reads ``.gz`` as is).
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "data", "traces")
MB = 1024 * 1024


# ----------------------------------------------------------------------------- job kinds
def send_email(rnd: random.Random) -> None:
    """Noise: a few temporaries of random size, all freed."""
    body = [str(rnd.random()) * rnd.randint(1, 40) for _ in range(rnd.randint(50, 400))]
    json.dumps(body)


def ping(rnd: random.Random) -> None:
    sum(range(rnd.randint(100, 5000)))


def render_invoice(rnd: random.Random) -> None:
    from memwarden import workload

    workload.leak(0.25)


def sync_stock(rnd: random.Random) -> None:
    from memwarden import workload

    workload.leak(0.15, chunk=16 * 1024)


def build_pdf(rnd: random.Random) -> None:
    from memwarden import workload

    workload.leak(1.0)


def resize_image(rnd: random.Random) -> None:
    """A big transient allocation (above glibc's mmap threshold cap): freed at once."""
    from memwarden import workload

    workload.spike(48)


def export_csv(rnd: random.Random) -> None:
    from memwarden import workload

    workload.spike(64)


def import_batch(rnd: random.Random) -> None:
    """Multi-threaded fragmentation over batches of 4-48 MiB (big ones rare). A sliver
    (1 in 20 buffers) of each of the last 6 batches is kept, scattered through glibc's
    per-thread arenas: live memory stays bounded while RSS climbs in steps to the
    high-water mark of the biggest batch so far and stays there."""
    from memwarden import workload

    mb = int(4 + 44 * rnd.random() ** 3)
    workload.fragment(mb, threads=4, keep_every=20, seed=rnd.randrange(1000))
    SLIVERS.append(list(workload.KEPT))
    workload.KEPT.clear()


SLIVERS: collections.deque[list[bytes]] = collections.deque(maxlen=6)


COUNTER = [0]


def lookup_price(rnd: random.Random) -> None:
    """A bounded cache (64 × 256 KiB): fills over its first 64 runs, then stays."""
    from memwarden import workload

    COUNTER[0] += 1
    workload.cache_fill(COUNTER[0])


AUDIT: list[bytes] = []
PIN: list[bytes] = []


def audit_log(rnd: random.Random) -> None:
    """A leak into free malloc chunks: 2 × 30 KB kept per run, landing in space that
    ``aggregate`` freed below its pinned top, so this job's own RSS barely moves."""
    AUDIT.append(b"\x07" * 30000)
    AUDIT.append(b"\x07" * 30000)


def aggregate(rnd: random.Random) -> None:
    """12 MB of temporaries below a small object kept until the next run (the heap top
    cannot be trimmed under it): the job that needs fresh heap when the leak ate the space."""
    bufs = [b"\x05" * 60000 for _ in range(200)]
    pin = b"\x06" * 60000
    del bufs
    PIN[:] = [pin]


KINDS: dict[str, Callable[[random.Random], None]] = {
    f.__name__: f
    for f in (
        send_email,
        ping,
        render_invoice,
        sync_stock,
        build_pdf,
        resize_image,
        export_csv,
        import_batch,
        lookup_price,
        audit_log,
        aggregate,
    )
}


# ----------------------------------------------------------------------------- scenarios
@dataclass
class Scenario:
    name: str
    pattern: str
    first_suspect: str | None
    mix: dict[str, int]  # kind -> weight
    jobs: int
    about: str
    live: bool = True
    lifetimes: int = 1
    env: dict[str, str] = field(default_factory=dict)
    restart_over_mb: int | None = None  # soft limit = start RSS + this; restart by exit


SCENARIOS = [
    Scenario(
        "leak",
        "leak",
        "render_invoice",
        {"send_email": 5, "render_invoice": 2, "resize_image": 1},
        500,
        "render_invoice keeps 256 KiB per run; resize_image spikes 48 MiB and frees it",
    ),
    Scenario(
        "fragmentation",
        "bloat",
        "import_batch",
        {"import_batch": 1, "ping": 6, "send_email": 3},
        400,
        "import_batch: 4 threads allocate 4-48 MiB of 1-64 KiB buffers (glibc arenas)",
    ),
    Scenario(
        "fragmentation_rss_only",
        "bloat",
        "import_batch",
        {"import_batch": 1, "ping": 6, "send_email": 3},
        400,
        "as fragmentation, without live-memory figures",
        live=False,
    ),
    Scenario(
        "cache",
        "bloat",
        "lookup_price",
        {"lookup_price": 3, "send_email": 5, "ping": 2},
        700,
        "lookup_price fills a 16 MiB cache over its first 64 runs, then it stays",
    ),
    Scenario(
        "spikes",
        "stable",
        None,
        {"export_csv": 1, "send_email": 4, "ping": 3},
        300,
        "export_csv allocates 64 MiB and frees it (mmap): nothing stays",
    ),
    Scenario(
        "delayed_leak",
        "leak",
        "audit_log",
        {"audit_log": 1, "aggregate": 1, "send_email": 3, "ping": 3},
        800,
        "audit_log leaks into free malloc chunks; the RSS jumps land in aggregate",
    ),
    Scenario(
        "delayed_leak_rss_only",
        "leak",
        "audit_log",
        {"audit_log": 1, "aggregate": 1, "send_email": 3, "ping": 3},
        800,
        "as delayed_leak, without live-memory figures",
        live=False,
    ),
    Scenario(
        "mixed",
        "leak",
        "sync_stock",
        {
            "send_email": 6,
            "ping": 4,
            "sync_stock": 2,
            "import_batch": 1,
            "lookup_price": 2,
            "resize_image": 1,
        },
        1500,
        "six kinds: a slow leak (sync_stock), fragmentation, a filling cache, spikes, noise",
    ),
    Scenario(
        "leak_restarts",
        "leak",
        "build_pdf",
        {"build_pdf": 1, "send_email": 3},
        900,
        "build_pdf keeps 1 MiB per run; the warden restarts each worker at +80 MiB",
        live=False,
        lifetimes=3,
        restart_over_mb=80,
    ),
    Scenario(
        "stable",
        "stable",
        None,
        {"send_email": 5, "ping": 5},
        400,
        "only temporaries",
    ),
]


# ----------------------------------------------------------------------------- one worker
def run_worker(name: str, journal: str, jobs: int, seed: int, state: str) -> None:
    """One worker lifetime: run jobs until ``jobs`` are done or the warden restarts us."""
    import threading

    from memwarden import Hooks, Journal, Warden
    from memwarden.gauges.proc import self_rss

    sc = {s.name: s for s in SCENARIOS}[name]
    rnd = random.Random(seed)
    kinds = list(sc.mix)
    weights = [sc.mix[k] for k in kinds]
    draining = threading.Event()
    options: dict[str, object] = {"soft_limit": "100GB", "restart": "none"}
    if sc.restart_over_mb:
        options = {
            "soft_limit": f"{self_rss() // MB + sc.restart_over_mb}MiB",
            "restart": "exit",
            "exit_code": 75,
            "grace": 0,
            "min_uptime": 0,
            "max_restarts": 1000,
        }
    warden = Warden(
        hooks=Hooks(drain=draining.set),
        journal=Journal(journal, max_bytes=100 * 10**6),
        live_memory=sc.live,
        interval=0.25,
        state_dir=state,
        framework="script",
        **options,
    ).start()
    for i in range(jobs):
        if draining.is_set():
            break
        kind = rnd.choices(kinds, weights)[0]
        with warden.job(kind, f"{seed}-{i}"):
            KINDS[kind](rnd)
    time.sleep(0.3 if not draining.is_set() else 30)  # a restart exits us meanwhile
    warden.stop()


def record(sc: Scenario, out_dir: str) -> str:
    work = tempfile.mkdtemp(prefix="memwarden-record-")
    journal = os.path.join(work, "journal.jsonl")
    env = {**os.environ, **sc.env}
    env.pop("MALLOC_ARENA_MAX", None)
    try:
        done = 0
        for life in range(sc.lifetimes * 4):
            if life >= sc.lifetimes and not sc.restart_over_mb:
                break
            left = sc.jobs - done
            if left <= 0:
                break
            args = [sys.executable, __file__, "--worker", sc.name, journal, str(left), str(life)]
            subprocess.run([*args, os.path.join(work, "state")], env=env, check=False)
            with open(journal) as f:
                done = sum(1 for line in f if '"event": "job"' in line)
        path = os.path.join(out_dir, f"{sc.name}.jsonl.gz")
        with open(journal, "rb") as src, gzip.GzipFile(path, "wb", mtime=0) as dst:
            shutil.copyfileobj(src, dst)
        return path
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--worker"]:
        name, journal, jobs, seed, state = argv[1:6]
        run_worker(name, journal, int(jobs), int(seed), state)
        return
    out = OUT
    if argv[:1] == ["--out"]:
        out, argv = argv[1], argv[2:]
    os.makedirs(out, exist_ok=True)
    wanted = [s for s in SCENARIOS if not argv or s.name in argv]
    labels_path = os.path.join(out, "labels.json")
    labels = {}
    if os.path.exists(labels_path):
        with open(labels_path) as f:
            labels = json.load(f)
    for sc in wanted:
        t0 = time.monotonic()
        path = record(sc, out)
        labels[sc.name] = {
            "file": os.path.basename(path),
            "pattern": sc.pattern,
            "first_suspect": sc.first_suspect,
            "about": sc.about,
            "live_memory": sc.live,
        }
        size = os.path.getsize(path)
        print(f"{sc.name}: {path} ({size // 1024} KiB, {time.monotonic() - t0:.1f}s)")
    with open(labels_path, "w") as f:
        json.dump(labels, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
