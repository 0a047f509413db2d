"""Record labelled journals from real Python workloads, for ``tests/test_diagnose.py``.

Each scenario runs real job kinds (``memwarden.workload``: a real leak, real multi-threaded
glibc fragmentation, a cache that fills and stops, big allocations that are freed, buffers
of 256 KiB to 5 MiB that malloc serves by mmap and that are kept) in fresh worker
processes, each with a real ``Warden`` writing a journal: one job at a time, or four at
once from a pool of threads (``threads=4``). ``run_*`` scenarios are ``memwarden run`` of a
command in a real memory cgroup (its samples' ``rss`` is then the supervisor's own, its
``total`` the command's): a leaking worker that journals its own jobs, which ``run`` kills
at the hard limit again and again, and a stable command that journals nothing. The label
is what the workload *is* (the expected pattern and the kind to blame), not what diagnose
says.

    .venv/bin/python scripts/record_traces.py            # all scenarios -> tests/data/traces
    .venv/bin/python scripts/record_traces.py leak mixed  # some of them
    .venv/bin/python scripts/record_traces.py --out /tmp/traces  # elsewhere

``tests/data/traces/v0/`` holds the journals this script recorded before job records
carried ``mmapped``: kept as they are, they are what older journals look like (live
figures blind to big buffers), and the verdicts asserted on them still hold.

A journal is gzipped JSONL (``memwarden diagnose`` reads gzip as is). The ``run_*``
scenarios need a writable memory cgroup (root, cgroup v1 or v2); they are skipped elsewhere.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

from _harness import BenchCgroup  # the benches' memory cgroup (bench/_harness.py)

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


BIG: list[bytes] = []


def keep_buffers(rnd: random.Random) -> None:
    """The issue's leak: a 5 MiB buffer kept per call. Over glibc's mmap threshold, so it
    moves ``mmapped`` (hblkhd), never ``heap_in_use`` (uordblks)."""
    BIG.append(b"\x08" * (5 * MB))


def attach_pdf(rnd: random.Random) -> None:
    """Keeps 4 buffers of 256 KiB per run (1 MiB): big objects, each served by mmap."""
    BIG.extend(b"\x09" * (256 * 1024) for _ in range(4))


def import_rows(rnd: random.Random) -> None:
    """Fragmentation in the calling thread's own arena (a pool of threads has one arena
    each): 4-40 MiB of 1-64 KiB buffers, 1 in 20 kept for the next 6 runs."""
    from memwarden import workload

    mb = int(4 + 36 * rnd.random() ** 3)
    with ROWS_LOCK:  # workload.KEPT is shared: one at a time takes its slivers from it
        workload.fragment(mb, threads=0, keep_every=20, seed=rnd.randrange(1000))
        SLIVERS.append(list(workload.KEPT))
        workload.KEPT.clear()


ROWS_LOCK = threading.Lock()


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
        keep_buffers,
        attach_pdf,
        import_rows,
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
    threads: int = 0  # jobs at once (a pool of threads); 0: one at a time
    note: str | None = None  # a note the verdict must carry
    #: why RSS alone (live figures taken out) cannot tell this one: its test is skipped
    rss_alone_ambiguous: str | None = None


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
        rss_alone_ambiguous="a 0.15 MiB/run leak beside fragmentation swings of several "
        "MiB: by RSS alone one recording reads LEAK, another BLOAT (tests/data/traces/v0 "
        "keeps one that reads LEAK); live memory tells",
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
    Scenario(
        "big_leak",
        "leak",
        "keep_buffers",
        {"keep_buffers": 1, "import_batch": 1, "export_csv": 1, "send_email": 4},
        420,
        "keep_buffers keeps a 5 MiB buffer per call (mmap'd) beside fragmentation and 64 MiB "
        "spikes",
    ),
    Scenario(
        "big_leak_rss_only",
        "leak",
        "keep_buffers",
        {"keep_buffers": 1, "import_batch": 1, "export_csv": 1, "send_email": 4},
        420,
        "as big_leak, without live-memory figures",
        live=False,
    ),
    Scenario(
        "threads_leak",
        "leak",
        "attach_pdf",
        {"attach_pdf": 1, "send_email": 4, "resize_image": 1, "ping": 2},
        800,
        "4 jobs at once (threads): attach_pdf keeps 4 x 256 KiB per run, resize_image spikes",
        threads=4,
    ),
    Scenario(
        "threads_leak_rss_only",
        "leak",
        "attach_pdf",
        {"attach_pdf": 1, "send_email": 4, "resize_image": 1, "ping": 2},
        800,
        "as threads_leak, without live-memory figures",
        live=False,
        threads=4,
    ),
    Scenario(
        "threads_bloat",
        "bloat",
        "import_rows",
        {"import_rows": 1, "send_email": 4, "ping": 3},
        600,
        "4 jobs at once (threads): import_rows fragments its thread's own arena",
        threads=4,
    ),
    Scenario(
        "celery_big_leak",
        "leak",
        "shop.keep_buffers",
        {
            "shop.keep_buffers": 1,
            "shop.import_batch": 1,
            "shop.export_csv": 1,
            "shop.send_email": 4,
        },
        420,
        "the issue's case, in a real Celery prefork worker (-c 2, Redis, 768 MiB cgroup): "
        "shop.keep_buffers keeps 5 MiB per call beside fragmentation and 64 MiB spikes",
    ),
    Scenario(
        "run_leak",
        "leak",
        "sync_orders",
        {},
        0,
        "memwarden run (cgroup 320 MiB, hard limit 200 MiB) of a worker that journals its "
        "jobs; sync_orders keeps 2 MiB per run: killed at the hard limit 5 times",
    ),
    Scenario(
        "run_stable",
        "stable",
        None,
        {},
        0,
        "memwarden run (cgroup 320 MiB) of a command with only temporaries, no job records",
        note="No job records: verdict on the process only.",
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
    options: dict[str, Any] = {"soft_limit": "100GB", "restart": "none"}
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
    # the figures stay on for the whole recording (a busy machine can make a read dear
    # enough for the budget to turn them off, leaving a lifetime half recorded)
    warden.live.job_done = lambda duration_s: None  # type: ignore[method-assign]
    if sc.threads:
        run_concurrently(warden, sc, rnd, kinds, weights, jobs, seed)
    else:
        for i in range(jobs):
            if draining.is_set():
                break
            kind = rnd.choices(kinds, weights)[0]
            with warden.job(kind, f"{seed}-{i}"):
                KINDS[kind](rnd)
    time.sleep(0.3 if not draining.is_set() else 30)  # a restart exits us meanwhile
    warden.stop()


def run_concurrently(
    warden: object,
    sc: Scenario,
    rnd: random.Random,
    kinds: list[str],
    weights: list[int],
    jobs: int,
    seed: int,
) -> None:
    """``jobs`` jobs from a pool of ``sc.threads`` threads, each job holding its thread a
    few ms more (waiting on I/O, as jobs do) so that they overlap."""
    from concurrent.futures import ThreadPoolExecutor

    plan = [(rnd.choices(kinds, weights)[0], rnd.randrange(1 << 30)) for _ in range(jobs)]

    def one(i: int) -> None:
        kind, job_seed = plan[i]
        mine = random.Random(job_seed)
        with warden.job(kind, f"{seed}-{i}"):  # type: ignore[attr-defined]
            KINDS[kind](mine)
            time.sleep(mine.uniform(0.01, 0.04))

    with ThreadPoolExecutor(sc.threads) as pool:
        list(pool.map(one, range(jobs)))


def record(sc: Scenario, out_dir: str) -> str | None:
    if sc.name.startswith("run_"):
        return record_run(sc, out_dir)
    if sc.name.startswith("celery_"):
        return record_celery(sc, out_dir)
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
        return pack(journal, out_dir, sc.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pack(journal: str, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, f"{name}.jsonl.gz")
    with open(journal, "rb") as src, gzip.GzipFile(path, "wb", mtime=0) as dst:
        shutil.copyfileobj(src, dst)
    return path


# ----------------------------------------------------------------------------- memwarden run
#: The leaking worker under ``memwarden run``: it journals its own jobs (an in-process
#: warden that never acts: its limits are far away), into the journal ``run`` writes.
RUN_LEAK = """
import os, random, sys, time
from memwarden import Warden
KEPT = []
w = Warden(soft_limit="100GB", hard_limit="200GB", restart="none", measure="process",
           journal=os.environ["RECORD_JOURNAL"], state_dir=sys.argv[1], framework="script")
rnd = random.Random(os.getpid())
i = 0
while True:
    kind = rnd.choice(["sync_orders", "send_email", "send_email", "ping"])
    with w.job(kind, f"{os.getpid()}-{i}"):
        if kind == "sync_orders":
            KEPT.append(b"\\x0a" * (2 * 1024 * 1024))
        elif kind == "send_email":
            tmp = [str(rnd.random()) * 20 for _ in range(2000)]
            del tmp
        else:
            sum(range(3000))
        time.sleep(0.03)
    i += 1
"""

#: The stable command: temporaries only, and no journal of its own.
RUN_STABLE = """
import random, time
rnd = random.Random(1)
while True:
    tmp = [str(rnd.random()) * rnd.randint(1, 40) for _ in range(rnd.randint(1000, 20000))]
    del tmp
    time.sleep(0.05)
"""


def scenario_cgroup(name: str, limit: int, work: str) -> BenchCgroup | None:
    """A memory cgroup of ``limit`` (the benches' dyno), or None where none can be made: the
    scenario is skipped, said so, and ``work`` removed."""
    try:
        return BenchCgroup(limit)
    except (OSError, SystemExit) as exc:  # SystemExit: this process has no memory cgroup
        print(f"{name}: skipped, no memory cgroup to make ({exc})")
        shutil.rmtree(work, ignore_errors=True)
        return None


# ----------------------------------------------------------------------------- Celery
CELERY_APP = """
import os, random
from celery import Celery
import memwarden.celery
from memwarden import workload

app = Celery("recorded", broker=os.environ["REC_BROKER"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_default_queue=os.environ["REC_QUEUE"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_enable_remote_control=False,
)
memwarden.celery.guard(app)
KEPT = []
SLIVERS = []


@app.task(name="shop.keep_buffers")
def keep_buffers(seed):
    KEPT.append(b"\\x08" * (5 * 1024 * 1024))  # 5 MiB kept per call: served by mmap


@app.task(name="shop.import_batch")
def import_batch(seed):
    rnd = random.Random(seed)
    workload.fragment(int(4 + 44 * rnd.random() ** 3), threads=4, keep_every=20, seed=seed)
    SLIVERS.append(list(workload.KEPT))
    del SLIVERS[:-6]
    workload.KEPT.clear()


@app.task(name="shop.export_csv")
def export_csv(seed):
    workload.spike(64)


@app.task(name="shop.send_email")
def send_email(seed):
    rnd = random.Random(seed)
    body = [str(rnd.random()) * rnd.randint(1, 40) for _ in range(rnd.randint(50, 400))]
    del body
"""


def record_celery(sc: Scenario, out_dir: str) -> str | None:
    """A real ``celery worker -P prefork -c 2`` on the local Redis, in a 768 MiB memory
    cgroup, guarded by memwarden with its defaults; ``sc.jobs`` tasks of ``sc.mix``."""
    try:
        import redis
    except ImportError:
        print(f"{sc.name}: skipped, no redis client")
        return None
    broker = "redis://127.0.0.1:6379/0"
    queue = f"memwarden-record-{uuid.uuid4().hex[:8]}"
    store = redis.Redis.from_url(broker)
    try:
        store.ping()
    except redis.RedisError as exc:
        print(f"{sc.name}: skipped, no Redis at {broker} ({exc})")
        return None
    work = tempfile.mkdtemp(prefix="memwarden-record-")
    journal = os.path.join(work, "journal.jsonl")
    with open(os.path.join(work, "recorded.py"), "w") as f:
        f.write(CELERY_APP)
    env = {
        **os.environ,
        "REC_BROKER": broker,
        "REC_QUEUE": queue,
        "MEMWARDEN_JOURNAL": journal,
        "MEMWARDEN_STATE_DIR": os.path.join(work, "state"),
        "PYTHONPATH": work,
    }
    env.pop("MALLOC_ARENA_MAX", None)
    cg = scenario_cgroup(sc.name, 768 * MB, work)
    if cg is None:
        return None
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    argv = [celery, "-A", "recorded", "worker", "-P", "prefork", "-c", "2", "-Q", queue]
    argv += ["--loglevel=WARNING", "--without-gossip", "--without-mingle"]
    try:
        worker = subprocess.Popen(argv, env=env, cwd=work, preexec_fn=cg.join)
        sender = _celery_sender(broker, queue)
        rnd = random.Random(14)
        kinds = list(sc.mix)
        for i in range(sc.jobs):
            sender.send_task(rnd.choices(kinds, [sc.mix[k] for k in kinds])[0], args=[i])
        deadline = time.monotonic() + 600
        while count(journal, "job") < sc.jobs and time.monotonic() < deadline:
            if worker.poll() is not None:
                break
            time.sleep(0.5)
        time.sleep(2)  # a few more readings of the idle worker
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        return pack(journal, out_dir, sc.name)
    finally:
        cg.remove()
        for key in store.scan_iter(f"*{queue}*"):  # the queue and its binding
            store.delete(key)
        shutil.rmtree(work, ignore_errors=True)


def _celery_sender(broker: str, queue: str) -> Any:
    from celery import Celery  # type: ignore[import-untyped]

    sender = Celery("sender", broker=broker)
    sender.conf.task_default_queue = queue
    return sender


def count(journal: str, event: str) -> int:
    try:
        with open(journal) as f:
            return sum(1 for line in f if f'"event": "{event}"' in line)
    except OSError:
        return 0


def record_run(sc: Scenario, out_dir: str) -> str | None:
    """``memwarden run`` of a command in a 320 MiB cgroup, hard limit 200 MiB: until it
    has killed the leaking worker 5 times, or for 60 readings of the stable command."""
    work = tempfile.mkdtemp(prefix="memwarden-record-")
    journal = os.path.join(work, "journal.jsonl")
    script = os.path.join(work, "command.py")
    with open(script, "w") as f:
        f.write(RUN_LEAK if sc.name == "run_leak" else RUN_STABLE)
    env = {**os.environ, "RECORD_JOURNAL": journal}
    env.pop("MALLOC_ARENA_MAX", None)
    cg = scenario_cgroup(sc.name, 320 * MB, work)
    if cg is None:
        return None
    cmd = [sys.executable, "-m", "memwarden.cli", "run", "--hard-limit", "200MB"]
    cmd += ["--journal", journal, "--no-status", "--", sys.executable, script]
    cmd.append(os.path.join(work, "state"))
    done = (lambda: count(journal, "kill") >= 5) if sc.name == "run_leak" else None
    try:
        run = subprocess.Popen(cmd, env=env, preexec_fn=cg.join)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run.poll() is None:
            if (done or (lambda: count(journal, "sample") >= 60))():
                break
            time.sleep(0.2)
        run.send_signal(signal.SIGTERM)
        run.wait(60)
        return pack(journal, out_dir, sc.name)
    finally:
        cg.remove()
        shutil.rmtree(work, ignore_errors=True)


def complete_live_figures(path: str) -> bool:
    """Whether every job record carries live figures that see big buffers (a real
    framework's workers may turn theirs off where a read is dear for their job time)."""
    with gzip.open(path, "rt") as f:
        jobs = [json.loads(line) for line in f if '"event": "job"' in line]
    return bool(jobs) and all("mmapped" in j or "allocated" in j for j in jobs)


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
        if path is None:
            continue
        labels[sc.name] = {
            "file": os.path.basename(path),
            "pattern": sc.pattern,
            "first_suspect": sc.first_suspect,
            "about": sc.about,
            "live_memory": complete_live_figures(path),
            **({"note": sc.note} if sc.note else {}),
            **({"rss_alone_ambiguous": sc.rss_alone_ambiguous} if sc.rss_alone_ambiguous else {}),
        }
        size = os.path.getsize(path)
        print(f"{sc.name}: {path} ({size // 1024} KiB, {time.monotonic() - t0:.1f}s)")
    with open(labels_path, "w") as f:
        json.dump(labels, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
