"""``memwarden diagnose`` and ``report`` on big journals: seconds and peak RSS per size.

    .venv/bin/python bench/diagnose_scale.py                 # 10, 100 and 400 MB
    .venv/bin/python bench/diagnose_scale.py --sizes 10 50   # other sizes (MB)
    .venv/bin/python bench/diagnose_scale.py --stdlib        # json, though msgspec/orjson are in
    .venv/bin/python bench/diagnose_scale.py --no-msgspec    # orjson alone (msgspec hidden)
    .venv/bin/python bench/diagnose_scale.py --dir /tmp/j    # journals kept there, reused
    .venv/bin/python bench/diagnose_scale.py --against /tmp/old/src   # old code beside

Generates journals as a fleet of four workers writes them into one file: 12 job kinds (one
keeps 48 KiB per run), records of ~350 bytes with live-memory figures, a watchdog sample
every 10 jobs, each worker restarted (a new pid) at its soft limit after a reclaim; then
runs each command in a fresh process (``-m memwarden.cli``), its wall time, its CPU time
(user + system) and its peak RSS (``ru_maxrss``) measured by ``wait4``. On a shared
machine the wall time depends on the neighbours; the CPU time much less: both are shown,
and ``cpu_mb_per_s`` is the size over the CPU time. Goal: peak RSS under 150 MB at 400 MB,
time linear in size, at least 30 MB/s. Each run's verdict and first suspect are printed
beside (the journal's leak is ``billing.export``). The machine's load average is printed
before each size. ``--against SRC`` runs each command a second time, just before, with
``SRC`` (another checkout's ``src``, e.g. ``git archive HEAD~3 src | tar -x -C /tmp/old``)
first on ``PYTHONPATH``: the code before and after a change on the same journals, under
the same load.

Last lines, one per command and size::

    command=<diagnose|report> size_mb=<int> seconds=<float> cpu_seconds=<float> \
mb_per_s=<float> cpu_mb_per_s=<float> peak_rss_mb=<float> verdict=<str> first=<str>
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

MB = 1000 * 1000
MiB = 1024 * 1024
KINDS = [
    "shop.send_email",
    "shop.render_invoice",
    "shop.sync_stock",
    "shop.resize_image",
    "billing.export",
    "billing.charge",
    "crm.import_contacts",
    "crm.dedupe",
    "search.reindex",
    "search.suggest",
    "ops.cleanup",
    "ops.heartbeat",
]
WEIGHTS = [30, 12, 10, 6, 4, 8, 5, 3, 6, 9, 3, 20]
LEAKER = "billing.export"
SOFT = 420 * MiB
HARD = 480 * MiB


class Worker:
    """One worker of the fleet: its pid (a new one per restart), level and live memory."""

    def __init__(self, n: int, rnd: random.Random) -> None:
        self.n = n
        self.rnd = rnd
        self.pid = 1000 + n
        self.jobs = 0
        self.fresh()

    def fresh(self) -> None:
        self.level = self.rnd.uniform(70, 90) * MiB
        self.live = 30 * MiB
        self.blocks = 200_000

    def records(self, ts: float) -> list[str]:
        rnd = self.rnd
        kind = rnd.choices(KINDS, WEIGHTS)[0]
        before, live_before, blocks_before = self.level, self.live, self.blocks
        if kind == LEAKER:
            self.live += 48 * 1024
            self.level += 48 * 1024
        if kind == "shop.resize_image" and rnd.random() < 0.02:
            self.level += 2 * MiB  # a fragmentation step now and then
        self.jobs += 1
        job = {
            "event": "job",
            "ts": round(ts, 6),
            "pid": self.pid,
            "job": kind,
            "job_id": f"{rnd.getrandbits(64):016x}-{rnd.getrandbits(48):012x}",
            "rss_before": int(before),
            "rss_after": int(self.level + rnd.gauss(0, 0.3 * MiB)),
            "duration_s": round(rnd.uniform(0.005, 0.4), 6),
            "blocks": self.blocks + rnd.randrange(-500, 500),
            "blocks_before": blocks_before,
            "heap_in_use": int(self.live * 0.8 + rnd.gauss(0, 64 * 1024)),
            "heap_in_use_before": int(live_before * 0.8),
            "mmapped": int(self.live * 0.2),
            "mmapped_before": int(live_before * 0.2),
            "framework": "celery",
            "queue": "default",
        }
        out = [json.dumps(job)]
        if self.jobs % 10 == 0:
            sample = {
                "event": "sample",
                "ts": round(ts + 0.001, 6),
                "pid": self.pid,
                "rss": int(self.level),
                "total": int(self.level * 1.05),
                "limit": SOFT,
                "hard": HARD,
                "gauge": "cgroup",
            }
            out.append(json.dumps(sample))
        if self.level > SOFT:
            out += self.restart(ts)
        return out

    def restart(self, ts: float) -> list[str]:
        freed = int(self.rnd.uniform(1, 6) * MiB)
        reclaim = {
            "event": "reclaim",
            "ts": round(ts + 0.002, 6),
            "pid": self.pid,
            "freed": freed,
            "rss_before": int(self.level),
            "rss_after": int(self.level - freed),
            "total_before": int(self.level * 1.05),
            "total_after": int((self.level - freed) * 1.05),
            "trimmed": True,
            "reason": f"{self.level / MiB:.1f} MiB over soft limit {SOFT / MiB:.1f} MiB",
        }
        restart = {
            "event": "restart",
            "ts": round(ts + 3.0, 6),
            "pid": self.pid,
            "reason": f"{self.level / MiB:.1f} MiB over soft limit {SOFT / MiB:.1f} MiB for 60s",
            "total": int(self.level * 1.05),
            "limit": SOFT,
            "gauge": "cgroup",
            "in_flight": [],
            "action": "signal",
        }
        self.pid += 10
        self.fresh()
        return [json.dumps(reclaim), json.dumps(restart)]


def generate(path: str, size: int, seed: int = 14) -> int:
    """A journal of about ``size`` bytes; returns its size."""
    rnd = random.Random(seed)
    workers = [Worker(n, rnd) for n in range(4)]
    ts = 1_700_000_000.0
    written = 0
    with open(path, "w") as f:
        while written < size:
            lines = []
            for w in workers:
                ts += rnd.uniform(0.01, 0.1)
                lines += w.records(ts)
            text = "\n".join(lines) + "\n"
            f.write(text)
            written += len(text)
    return os.path.getsize(path)


#: Runs the command line with the modules named hidden (``{}``), e.g. orjson and msgspec:
#: the standard library's parser.
HIDING = "import sys; sys.modules.update(dict.fromkeys({})); from memwarden.cli import main; main()"


def measure_rss(
    args: list[str], hide: tuple[str, ...] = (), src: str | None = None
) -> tuple[float, float, float, bytes]:
    """Wall seconds, CPU seconds, peak RSS (MB) and stdout of one command in a fresh
    process, from ``wait4`` (``hide``: modules it cannot import; ``src``: the memwarden
    imported, else this one)."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        run = ["-c", HIDING.format(list(hide))] if hide else ["-m", "memwarden.cli"]
        proc = subprocess.Popen(
            [sys.executable, *run, *args], stdout=out, stderr=subprocess.PIPE, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read() if proc.stderr else b""
        if proc.returncode != 0:
            raise SystemExit(f"{args[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
        out.seek(0)
        cpu = usage.ru_utime + usage.ru_stime
        return seconds, cpu, usage.ru_maxrss * 1024 / MB, out.read()


def parser_name(hide: tuple[str, ...]) -> str:
    """The parsers the commands use: msgspec (job lines) and orjson (the rest) where this
    Python can import them and they are not hidden, else the standard library's json."""
    found = []
    for name in ("msgspec", "orjson"):
        if name in hide:
            continue
        try:
            __import__(name)
        except ImportError:
            continue
        found.append(name)
    return "+".join(found) or "json"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 400], help="MB")
    parser.add_argument("--dir", default=None, help="where the journals go and stay")
    parser.add_argument(
        "--stdlib", action="store_true", help="hide msgspec and orjson: stdlib json"
    )
    parser.add_argument("--no-msgspec", action="store_true", help="hide msgspec: orjson alone")
    parser.add_argument("--against", metavar="SRC", help="also run the memwarden in SRC")
    opts = parser.parse_args(argv)
    hide = ("msgspec", "orjson") if opts.stdlib else ("msgspec",) if opts.no_msgspec else ()
    work = opts.dir or tempfile.mkdtemp(prefix="memwarden-scale-")
    os.makedirs(work, exist_ok=True)
    rows = []
    try:
        for size in opts.sizes:
            path = os.path.join(work, f"journal-{size}mb.jsonl")
            t0 = time.perf_counter()
            kept = opts.dir is not None and os.path.exists(path)
            real = os.path.getsize(path) if kept else generate(path, size * MB)
            load = os.getloadavg()[0]
            took = time.perf_counter() - t0
            how = "kept" if kept else f"generated in {took:.0f}s"
            print(f"{path}: {real / MB:.0f} MB {how}; load average {load:.1f}", flush=True)
            html = os.path.join(work, f"report-{size}mb.html")
            for command, args in (
                ("diagnose", ["diagnose", path, "--json"]),
                ("report", ["report", path, "-o", html]),
            ):
                for label, src in ([("old", opts.against)] if opts.against else []) + [("", None)]:
                    seconds, cpu, peak, out = measure_rss(args, hide, src)
                    if command == "diagnose":
                        result = json.loads(out)
                        first = result["suspects"][0]["job"] if result["suspects"] else "-"
                    name = f"{command}({label})" if label else command
                    rows.append((name, real, seconds, cpu, peak, result["pattern"], first))
            if opts.dir is None:
                os.unlink(path)
    finally:
        if opts.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nparser: {parser_name(hide)}; load average now ", end="")
    print(f"{os.getloadavg()[0]:.1f}")
    head = f"{'command':<14} {'size':>7} {'wall s':>7} {'MB/s':>6} {'CPU s':>7} {'MB/s':>6}"
    print(f"{head} {'peak RSS':>9}  verdict")
    for cmd, real, seconds, cpu, peak, pattern, first in rows:
        print(
            f"{cmd:<14} {real / MB:>5.0f}MB {seconds:>7.1f} {real / MB / seconds:>6.1f} "
            f"{cpu:>7.1f} {real / MB / cpu:>6.1f} {peak:>7.0f}MB  {pattern} ({first})"
        )
    print()
    for cmd, real, seconds, cpu, peak, pattern, first in rows:
        print(
            f"command={cmd} size_mb={real / MB:.0f} seconds={seconds:.2f} cpu_seconds={cpu:.2f} "
            f"mb_per_s={real / MB / seconds:.1f} cpu_mb_per_s={real / MB / cpu:.1f} "
            f"peak_rss_mb={peak:.0f} verdict={pattern} first={first}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
