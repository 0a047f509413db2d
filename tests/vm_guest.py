"""Checks that run inside the cgroup v2 VM (:mod:`cgroup2_vm`), each printing one JSON line.

``python tests/vm_guest.py CHECK [ARGS]`` in the guest; the host's test module asserts on
the figures. Each check makes its own cgroups under ``/sys/fs/cgroup/mwt-*`` and removes
them (and every process left in them) at its end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
ROOT = "/sys/fs/cgroup"
MB = 1024 * 1024
MEMWARDEN = [sys.executable, "-c", "from memwarden.cli import main; main()"]


# --------------------------------------------------------------------- cgroups
def make(rel: str, max_bytes: int | None = None, controllers: bool = False) -> str:
    """``/sys/fs/cgroup/<rel>`` (parents made with the memory and pids controllers for
    their children); ``controllers``: the same for its own children."""
    path = ROOT
    for part in rel.split("/"):
        enable(path)
        path = os.path.join(path, part)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
    if max_bytes is not None:
        write(path, "memory.max", str(max_bytes))
    if controllers:
        enable(path)
    return path


def enable(path: str) -> None:
    write(path, "cgroup.subtree_control", "+memory +pids")


def write(path: str, name: str, value: str) -> None:
    with open(os.path.join(path, name), "w") as f:
        f.write(value)


def read(path: str, name: str) -> str:
    with open(os.path.join(path, name)) as f:
        return f.read()


def events(path: str) -> dict[str, int]:
    out = {}
    for line in read(path, "memory.events").splitlines():
        k, v = line.split()
        out[k] = int(v)
    return out


def remove(path: str) -> None:
    """Kill every process under ``path``, then remove it bottom-up."""
    deadline = time.monotonic() + 20
    for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                pids = read(dirpath, "cgroup.procs").split()
                for pid in pids:
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), signal.SIGKILL)
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


@contextlib.contextmanager
def cgroup(rel: str, max_bytes: int | None = None, controllers: bool = False) -> Iterator[str]:
    top = os.path.join(ROOT, rel.split("/")[0])
    try:
        yield make(rel, max_bytes, controllers)
    finally:
        remove(top)


def joiner(path: str) -> Any:
    return lambda: write(path, "cgroup.procs", str(os.getpid()))


def report(**figures: Any) -> None:
    print(json.dumps(figures))


# --------------------------------------------------------------------- checks
CLONE_NEWNS, CLONE_NEWCGROUP = 0x00020000, 0x02000000


def seen_from(path: str, unshare: int = 0, remount: bool = False) -> Any:
    """The quota a process in cgroup ``path`` detects (a forked child: no new Python),
    after ``unshare`` (namespaces) and, with ``remount``, its own cgroup2 mount."""
    import ctypes

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.close(r)
            write(path, "cgroup.procs", str(os.getpid()))
            libc = ctypes.CDLL(None, use_errno=True)
            if unshare and libc.unshare(unshare) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            if remount:
                if libc.umount2(b"/sys/fs/cgroup", 0) != 0:
                    raise OSError(ctypes.get_errno(), "umount")
                if libc.mount(b"none", b"/sys/fs/cgroup", b"cgroup2", 0, None) != 0:
                    raise OSError(ctypes.get_errno(), "mount")
            from memwarden.gauges import environment_quota

            quota, cg = environment_quota({})
            answer: Any = {
                "limit": quota.limit,
                "source": quota.source,
                "platform": quota.platform,
                "version": cg and cg.version,
                "path": cg and cg.path,
            }
        except BaseException as exc:
            answer = repr(exc)
        os.write(w, json.dumps(answer).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def quota() -> None:
    """The smallest ``memory.max`` up the tree; the same seen from a cgroup namespace."""
    import memwarden.gauges  # noqa: F401  (imported once, before the forks)

    out: dict[str, Any] = {}
    with cgroup("mwt-quota/svc/leaf", None) as leaf:
        svc = os.path.dirname(leaf)
        write(os.path.dirname(svc), "memory.max", str(300 * MB))
        write(svc, "memory.max", str(500 * MB))
        out["nested"] = seen_from(leaf)
        write(leaf, "memory.max", str(200 * MB))
        out["leaf_smallest"] = seen_from(leaf)
        # A child given no memory controller (run's command cgroup beside other processes):
        # its memory is charged to, and read from, the nearest ancestor that has one.
        inner = os.path.join(leaf, "inner")
        os.mkdir(inner)
        out["no_controller"] = seen_from(inner)
        # A container's view: its own cgroup namespace and cgroup2 mount (Docker, Kubernetes).
        out["namespace"] = seen_from(leaf, CLONE_NEWCGROUP | CLONE_NEWNS, remount=True)
        # A cgroup namespace that kept the mount of the parent namespace (``unshare -C``).
        out["namespace_kept_mount"] = seen_from(leaf, CLONE_NEWCGROUP)
    report(**out)


GAUGE_CODE = """
import json, mmap, sys
from memwarden.gauges import CgroupGauge, environment_quota
quota, cg = environment_quota({})
anon = bytearray(b"\\x01") * (96 * 1024 * 1024)
with open(sys.argv[1], "rb") as f:  # page cache: read once, so inactive
    while f.read(1 << 20):
        pass
mem = cg.read()
print(json.dumps({"usage": mem.usage, "working_set": mem.working_set, "anon": mem.anon,
                  "inactive_file": mem.inactive_file, "fast": cg.working_set(),
                  "gauge": CgroupGauge(cg).read().total,
                  "stat": open(cg.path + "/memory.stat").read()}))
"""


def gauge(big_file: str) -> None:
    """The working set (usage − inactive file) of a cgroup holding anon memory and cache."""
    with cgroup("mwt-gauge", 600 * MB) as path:
        proc = subprocess.run(
            [sys.executable, "-c", GAUGE_CODE, big_file],
            preexec_fn=joiner(path),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        figures = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr}
    report(**figures)


OOM_CODE = """
held = []
while True:
    held.append(bytearray(b"\\x02") * (8 * 1024 * 1024))
"""


def oom() -> None:
    """memory.events ``oom_kill`` 0 → 1, read by the cgroup gauge's ``oom_kills``."""
    from memwarden.gauges.cgroup import Cgroup

    with cgroup("mwt-oom", 64 * MB) as path:
        cg = Cgroup(path, 2, ROOT)
        before = cg.read().oom_kills
        proc = subprocess.run(
            [sys.executable, "-c", OOM_CODE], preexec_fn=joiner(path), timeout=120, check=False
        )
        after = cg.read().oom_kills
        report(before=before, after=after, rc=proc.returncode, events=events(path))


def check() -> None:
    """``memwarden check --json`` (or its text) from inside a limited v2 cgroup."""
    with cgroup("mwt-check", 256 * MB) as path:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
        env["MEMWARDEN_STATE_DIR"] = "/tmp/mwt-check-state"
        text = subprocess.run(
            [*MEMWARDEN, "check"],
            preexec_fn=joiner(path),
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        report(rc=text.returncode, out=text.stdout, err=text.stderr, path=path)


#: Grows 40 MiB/s in touched 4 MiB pieces; a Python without site or memwarden starts fast.
GROWER = """
import time
held = []
while True:
    held.append(b"\\x01" * (4 << 20))
    time.sleep(0.1)
"""


def run(journal: str, seconds: float = 25.0) -> None:
    """``memwarden run`` of a command growing 40 MiB/s in a 256 MiB v2 cgroup: its command
    in a child cgroup of run's, restarted before the kernel's OOM killer acts."""
    with cgroup("mwt-run", 256 * MB) as path:
        argv = [*MEMWARDEN, "run", "--soft-limit", "50%", "--grace", "0", "--min-uptime", "0"]
        argv += ["--interval", "0.1", "--journal", journal, "--no-status", "--"]
        argv += ["python3", "-S", "-c", GROWER]
        proc = subprocess.Popen(argv, preexec_fn=joiner(path), stderr=subprocess.PIPE)
        seen: list[str] = []
        # Where the command's processes are while they run (the child cgroup), its
        # memory.high, and the controllers run's cgroup gives its children.
        command_cgroups: dict[str, list[str]] = {}
        highs: dict[str, str] = {}
        controllers: list[str] = []
        deadline = time.monotonic() + seconds * 4
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                for c in os.listdir(path):
                    sub = os.path.join(path, c)
                    if not os.path.isdir(sub):
                        continue
                    if c not in seen:
                        seen.append(c)
                    procs = command_cgroups.setdefault(c, [])
                    procs.extend(p for p in read(sub, "cgroup.procs").split() if p not in procs)
                    if os.path.exists(os.path.join(sub, "memory.high")):
                        highs[c] = read(sub, "memory.high").strip()
                controllers = read(path, "cgroup.subtree_control").split()
            if _count(journal, "restart") >= 2:
                break
            time.sleep(0.1)
        rc, err = _stop(proc)
        left = [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))]
        report(
            rc=rc,
            seen=seen,
            command_cgroups=command_cgroups,
            highs=highs,
            controllers=controllers,
            controllers_after=read(path, "cgroup.subtree_control").split(),
            left=left,
            events=events(path),
            err=err[-3000:],
        )


STALLER = """
import time
time.sleep(1.5)
held = []
for _ in range(100):
    held.append(b"\\x01" * (4 << 20))
time.sleep(600)
"""


def pressure(journal: str, seconds: float = 25.0) -> None:
    """``memwarden run`` with ``MEMWARDEN_PRESSURE_FULL`` of a command that wants 400 MiB
    in a cgroup whose ``memory.high`` is 64 MiB (no swap): throttled, it stalls — real full
    pressure, far under the soft limit — and run restarts it for the pressure."""
    with cgroup("mwt-psi", 512 * MB) as path:
        write(path, "memory.high", str(64 * MB))
        argv = [*MEMWARDEN, "run", "--soft-limit", "50%", "--grace", "0", "--min-uptime", "0"]
        argv += ["--interval", "0.1", "--journal", journal, "--no-status", "--"]
        argv += ["python3", "-S", "-c", STALLER]
        env = {**os.environ, "MEMWARDEN_PRESSURE_FULL": "20%", "MEMWARDEN_PRESSURE_HOLD": "2s"}
        env["MEMWARDEN_RECLAIM"] = "off"
        proc = subprocess.Popen(argv, preexec_fn=joiner(path), env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + seconds * 4
        psi = ""
        while time.monotonic() < deadline and _count(journal, "restart") < 1:
            psi = read(path, "memory.pressure")
            time.sleep(0.2)
        rc, err = _stop(proc)
        report(rc=rc, psi=psi, events=events(path), err=err[-3000:])


def _stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """SIGTERM ``memwarden run`` (it passes it on), wait; its status and stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(60)
    finally:
        proc.kill()
    return rc, proc.stderr.read().decode(errors="replace") if proc.stderr else ""


def _count(journal: str, event: str) -> int:
    try:
        with open(journal) as f:
            return sum(
                1 for line in f if f'"event": "{event}"' in line or f'"event":"{event}"' in line
            )
    except OSError:
        return 0


def redis_up() -> None:
    """Redis inside the guest, on its own loopback (the host's is not reachable)."""
    import redis

    client = redis.Redis(port=6379)
    try:
        client.ping()
        return
    except redis.ConnectionError:
        pass
    argv = ["redis-server", "--port", "6379", "--bind", "127.0.0.1", "--save", ""]
    subprocess.run([*argv, "--appendonly", "no", "--daemonize", "yes"], check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.ConnectionError):
            client.ping()
            return
        time.sleep(0.2)
    raise RuntimeError("redis-server did not answer in the guest")


CELERY_JOBS, LEAK_EVERY, LEAK_MB = 200, 5, 16


def celery(workdir: str) -> None:
    """The Celery prefork guard in a 384 MiB v2 cgroup, 200 jobs through Redis: 40 keep
    16 MiB each in their pool child (640 MiB in all: children are recycled)."""
    import redis

    redis_up()
    apps = TESTS / "apps"
    name = f"mwt-celery-{os.getpid()}"
    journal = os.path.join(workdir, "celery.jsonl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(TESTS.parent / "src"), str(apps)]),
        MWT_BROKER="redis://127.0.0.1:6379/1",
        MWT_QUEUE=name,
        MWT_RUN=name,
        MWT_PREFETCH="4",  # fewer broker round trips: emulated, each costs 10x
        MEMWARDEN_JOURNAL=journal,
        # The guest's tmpfs, as a state dir is on a real host: the work share is 9p, where
        # a pool child's mkfifo once failed with ENXIO (a CI run).
        MEMWARDEN_STATE_DIR=tempfile.mkdtemp(prefix="mwt-celery-state-"),
        MEMWARDEN_SOFT_LIMIT="60%",
        MEMWARDEN_HARD_LIMIT="88%",
        # Leaks of 16 MiB a job need no fast readings; emulated, each reading costs 10x.
        MEMWARDEN_INTERVAL="0.5",
        MEMWARDEN_ALERT_INTERVAL="0.2",
        MEMWARDEN_GRACE="1",
        MEMWARDEN_MIN_UPTIME="0",
        MEMWARDEN_MAX_RESTARTS="1000",
        MEMWARDEN_SHUTDOWN_TIMEOUT="20",
        MEMWARDEN_RESTART="signal",
    )
    argv = [sys.executable, "-m", "celery", "-A", "celery_jobs", "worker", "-P", "prefork"]
    argv += ["-c", "2", "-Q", name, "-n", f"{name}@%h", "-l", "INFO", "--without-gossip"]
    argv += ["--without-mingle", "--without-heartbeat"]
    marks = redis.Redis(db=1)
    log_path = os.path.join(workdir, "celery.log")
    starts: list[int] = []
    with cgroup("mwt-celery", 384 * MB) as path, open(log_path, "ab") as log:

        def start() -> subprocess.Popen[bytes]:
            proc = subprocess.Popen(
                argv, cwd=apps, env=env, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=joiner(path),
            )  # fmt: skip
            starts.append(proc.pid)
            return proc

        worker = start()
        t0 = time.monotonic()
        from celery import Celery  # while the worker starts: two vCPUs

        app = Celery("producer", broker="redis://127.0.0.1:6379/1")
        sent = []
        for n in range(CELERY_JOBS):
            job: tuple[Any, ...] = ("leak", LEAK_MB) if n % LEAK_EVERY == 0 else ()
            sent.append(app.send_task("mwt.work", args=job, queue=name).id)
        deadline = time.monotonic() + 400
        done: set[str] = set()
        while time.monotonic() < deadline:
            done = {m.decode() for m in marks.smembers(f"{name}:done")}
            if set(sent) <= done:
                break
            if worker.poll() is not None:  # restarted by its warden: the platform's part
                worker = start()
            time.sleep(0.5)
        seconds = time.monotonic() - t0
        worker.send_signal(signal.SIGQUIT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(30)
        oom_kill = events(path)["oom_kill"]
    for key in marks.scan_iter(f"{name}*"):
        marks.delete(key)
    for task_id in sent:
        marks.delete(f"celery-task-meta-{task_id}")
    marks.delete(name, f"_kombu.binding.{name}")
    records = []
    with contextlib.suppress(OSError), open(journal) as f:
        records = [json.loads(line) for line in f if line.strip()]
    report(
        sent=len(sent),
        seconds=round(seconds, 1),
        done=len(set(sent) & done),
        starts=starts,
        oom_kill=oom_kill,
        events={e: sum(r["event"] == e for r in records) for e in {r["event"] for r in records}},
        recycles=sum(
            1 for r in records if r["event"] == "restart" and r.get("action") == "recycle"
        ),
        job_pids=len({r["pid"] for r in records if r["event"] == "job"}),
        log_tail=Path(log_path).read_text(errors="replace")[-2000:],
    )


def demo(workdir: str) -> None:
    """``make demo`` (its venv taken as built) in a 512 MiB v2 cgroup."""
    with cgroup("mwt-demo", 512 * MB) as path:
        repo = str(TESTS.parent)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
        proc = subprocess.run(
            ["make", "-o", ".venv/.installed", "demo"],
            cwd=repo, env=env, preexec_fn=joiner(path), capture_output=True, text=True,
            timeout=300, check=False,
        )  # fmt: skip
        report(rc=proc.returncode, out=proc.stdout, err=proc.stderr[-3000:], events=events(path))


CHECKS = {
    "quota": quota,
    "gauge": gauge,
    "oom": oom,
    "check": check,
    "run": run,
    "pressure": pressure,
    "celery": celery,
    "demo": demo,
}

if __name__ == "__main__":
    CHECKS[sys.argv[1]](*sys.argv[2:])  # type: ignore[operator]
