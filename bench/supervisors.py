"""``memwarden run`` beside supervisord + superlance ``memmon``: the same bloating command,
the same limit, the same memory cgroup (the kernel's OOM killer is the judge).

The command (``bench/apps/bloat.py``) runs short jobs that leak steadily and keeps a helper
child; on SIGTERM it finishes its job and exits without stopping the helper. Contenders:

- ``none``: a plain restart loop (what a platform does when the process dies);
- ``supervisord-memmon``: supervisord (defaults) with ``memmon -c -p bloat=<soft limit>`` on
  ``TICK_5``, memmon's fastest tick;
- ``supervisord-memmon-70``: the same with memmon's threshold at 70% of the limit (headroom
  for memmon's 5 s tick and for the RSS of supervisord and memmon, which it does not count);
- ``memwarden-run``: ``memwarden run`` with the same soft limit (hard limit 95% of the
  cgroup's), grace 1 s, interval 0.25 s.

Usage::

    python bench/supervisors.py                 # 40 s per contender
    python bench/supervisors.py --out docs/     # also docs/bench-supervisors.md and .png
    python bench/supervisors.py --duration 8    # a quick look

Per contender: seconds over the hard limit, OOM kills, restarts, jobs interrupted (``lost``),
orphans (processes left in the cgroup after the supervisor stopped; ``orphans_max``: the
most seen at once while it ran). Last, one ``contender=... key=value`` line each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (
    APPS,
    BenchCgroup,
    Result,
    Sampler,
    bench_env,
    choose,
    descendants,
    dyno,
    headline,
    machine,
    publish,
    run_each,
    stop,
    table,
    write_text,
)
from memwarden.units import format_size, parse_size

ORDER = ("none", "supervisord-memmon", "supervisord-memmon-70", "memwarden-run")
COLUMNS = [
    ("jobs/s", "jobs_per_s"),
    ("jobs interrupted", "lost"),
    ("OOM kills", "oom_kills"),
    ("s over hard limit", "over_limit_s"),
    ("peak", "peak_bytes"),
    ("restarts", "restarts"),
    ("orphans left", "orphans_left"),
    ("orphans (max at once)", "orphans_max"),
]
HEADLINE = [
    ("jobs interrupted", "lost"),
    ("OOM kills", "oom_kills"),
    ("s over hard limit", "over_limit_s"),
    ("restarts", "restarts"),
    ("orphans left", "orphans_left"),
]


@dataclass(frozen=True)
class Settings:
    limit: int
    duration: float
    rate: float
    helper_mb: int
    grace: float
    interval: float

    @property
    def soft(self) -> int:
        return int(self.limit * 0.85)

    @property
    def hard(self) -> int:
        return int(self.limit * 0.95)


def available() -> dict[str, str | None]:
    from memwarden.cli import COMMANDS

    memmon = shutil.which("memmon", path=os.path.dirname(sys.executable)) or shutil.which("memmon")
    supervisord = shutil.which("supervisord", path=os.path.dirname(sys.executable))
    memmon_missing = (
        None
        if memmon and supervisord
        else "supervisord or memmon is not installed (pip install supervisor superlance)"
    )
    return {
        "none": None,
        "supervisord-memmon": memmon_missing,
        "supervisord-memmon-70": memmon_missing,
        "memwarden-run": None if "run" in COMMANDS else "`memwarden run` is not in this tree",
    }


def bloat_command(s: Settings) -> list[str]:
    return [
        sys.executable,
        os.path.join(APPS, "bloat.py"),
        "--rate",
        f"{s.rate:g}",
        "--helper-mb",
        str(s.helper_mb),
    ]


def supervisord_conf(s: Settings, workdir: str, threshold: int) -> str:
    bindir = os.path.dirname(sys.executable)
    return f"""\
[supervisord]
nodaemon=true
logfile={workdir}/supervisord.log
pidfile={workdir}/supervisord.pid
childlogdir={workdir}

[unix_http_server]
file={workdir}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{workdir}/supervisor.sock

[program:bloat]
command={" ".join(bloat_command(s))}
autorestart=true
startsecs=0
startretries=1000

[eventlistener:memmon]
command={bindir}/memmon -c -p bloat={threshold}
events=TICK_5
"""


def command(name: str, s: Settings, workdir: str) -> list[str]:
    if name.startswith("supervisord-memmon"):
        threshold = int(s.limit * 0.7) if name.endswith("-70") else s.soft
        conf = os.path.join(workdir, f"{name}.conf")
        write_text(conf, supervisord_conf(s, workdir, threshold))
        return [os.path.join(os.path.dirname(sys.executable), "supervisord"), "-c", conf]
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
            "--interval",
            f"{s.interval:g}",
            "--",
            *bloat_command(s),
        ]
    return bloat_command(s)


def orphans(cg: BenchCgroup, top: int | None) -> int:
    """Processes in the cgroup that are neither the supervisor nor its descendants."""
    tree = set() if top is None else {top, *descendants(top)}
    return sum(1 for pid in cg.pids() if pid not in tree)


def events(path: str) -> tuple[int, int, int]:
    """(starts, jobs begun, jobs done) from the command's event file."""
    starts = begun = done = 0
    try:
        with open(path) as f:
            for line in f:
                kind = line.split(" ", 1)[0]
                starts += kind == "start"
                begun += kind == "begin"
                done += kind == "done"
    except OSError:
        pass
    return starts, begun, done


def run_contender(name: str, s: Settings, workdir: str) -> Result:
    event_file = os.path.join(workdir, f"{name}.events")
    env = {k: v for k, v in bench_env().items() if not k.startswith("MEMWARDEN_")}
    env.update(
        BENCH_EVENTS=event_file,
        MEMWARDEN_MIN_UPTIME="0",
        MEMWARDEN_MAX_RESTARTS="1000",
        MEMWARDEN_STATE_DIR=os.path.join(workdir, f"{name}-state"),
    )
    cmd = command(name, s, workdir)
    orphans_max = 0
    with (
        dyno(s.limit) as cg,
        Sampler(cg, over=s.hard) as sampler,
        open(os.path.join(workdir, f"{name}.log"), "ab") as log,
    ):

        def start() -> subprocess.Popen[bytes]:
            return cg.spawn(cmd, env, log)

        proc = start()
        ready_by = time.monotonic() + 60
        while events(event_file)[0] == 0:  # the clock starts once the command runs
            if time.monotonic() > ready_by:
                raise SystemExit(f"bench: {name}: the command did not start in 60 s")
            time.sleep(0.05)
        t0 = time.monotonic()
        while time.monotonic() - t0 < s.duration:
            if proc.poll() is not None:
                proc = start()  # the platform starts a dead process again
            orphans_max = max(orphans_max, orphans(cg, proc.pid))
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        stop(proc, signal.SIGTERM, timeout=30)
        time.sleep(0.5)  # let anything the supervisor left behind show up as ours to count
        left = len(cg.pids())
        oom_kills = cg.oom_kills()
    starts, begun, done = events(event_file)
    return Result(
        name=name,
        jobs_per_s=done / elapsed,
        lost=begun - done,
        oom_kills=oom_kills,
        over_limit_s=sampler.over_limit_s,
        peak_bytes=sampler.peak,
        restarts=max(0, starts - 1),
        extra={"orphans_left": left, "orphans_max": orphans_max, "jobs_done": done},
        series=sampler.points,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contenders", default=",".join(ORDER), help="comma-separated subset")
    p.add_argument("--limit", default="256MiB", help="the cgroup limit (the quota)")
    p.add_argument("--duration", type=float, default=40.0, help="seconds per contender")
    p.add_argument("--rate", type=float, default=8.0, help="MiB/s the command leaks")
    p.add_argument("--helper-mb", type=int, default=16)
    p.add_argument("--grace", type=float, default=1.0, help="memwarden grace, seconds")
    p.add_argument("--interval", type=float, default=0.25, help="memwarden interval, seconds")
    p.add_argument("--out", help="write bench-supervisors.md and .png into this directory")
    p.add_argument("--readme", help="put the headline table into this file's marked block")
    a = p.parse_args(argv)
    s = Settings(
        limit=parse_size(a.limit, "--limit"),
        duration=a.duration,
        rate=a.rate,
        helper_mb=a.helper_mb,
        grace=a.grace,
        interval=a.interval,
    )
    names, skipped = choose(p, a.contenders, ORDER, available())
    results = run_each(names, lambda name, workdir: run_contender(name, s, workdir))
    lines = [
        f"Limit {format_size(s.limit)} (cgroup, no swap); soft {format_size(s.soft)}, hard "
        f"{format_size(s.hard)}; the command leaks {s.rate:g} MiB/s and keeps a "
        f"{s.helper_mb} MiB helper child; {s.duration:g} s per contender.",
        f"Machine: {machine()}.",
        f"Command: `python bench/supervisors.py {' '.join(argv)}`",
        "",
        table(results, COLUMNS),
    ]
    lines += [f"- {name}: not run ({why})" for name, why in skipped.items()]
    text = "\n".join(lines)
    publish(
        "supervisors",
        text,
        results,
        (s.limit, s.hard),
        "A bloating command under each supervisor (cgroup working set)",
        a.out,
        a.readme,
        headline(results, HEADLINE),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
