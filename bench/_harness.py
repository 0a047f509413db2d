"""Shared bench helpers: a real memory cgroup per contender, a 100 ms sampler, results.

Benches cannot import ``tests/``; this is the small cgroup "dyno" they need. Every contender
runs inside a fresh cgroup with the same real limit, so the kernel's OOM killer is the judge;
the sampler reads the cgroup's working set (usage − inactive file, the figure Kubernetes and
memwarden use) every 100 ms from outside and its ``oom_kill`` counter at the end.

Each bench prints a table, then last one line per contender::

    contender=<name> jobs_per_s=<float> lost=<int> oom_kills=<int> over_limit_s=<float> \
peak_bytes=<int> restarts=<int> [more key=value pairs]

:func:`parse_lines` reads those lines back (for the smoke test and for ``--from``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from memwarden.gauges.cgroup import Cgroup, _stat
from memwarden.gauges.proc import children_of
from memwarden.units import format_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPS = os.path.join(ROOT, "bench", "apps")
#: The first keys of every contender's last line, in this order (the issue's contract).
KEYS = ("jobs_per_s", "lost", "oom_kills", "over_limit_s", "peak_bytes", "restarts")


class BenchCgroup:
    """A memory cgroup child of our own, with a hard limit and no swap."""

    def __init__(self, limit: int) -> None:
        own = Cgroup.of_self()
        if own is None:
            raise SystemExit("bench: this process has no memory cgroup; cannot make a dyno")
        self.limit = limit
        # v2: a cgroup with processes (ours) gives its children no controller, so the dyno
        # goes beside ours where there is a parent to hold it.
        base = own.path
        if own.version == 2 and os.path.normpath(own.path) != os.path.normpath(own.top):
            base = os.path.dirname(own.path)
        self.path = os.path.join(base, f"memwarden-bench-{uuid.uuid4().hex[:8]}")
        os.mkdir(self.path)
        self.version = own.version
        self.cgroup = Cgroup(self.path, own.version)
        if own.version == 1:
            self._write("memory.limit_in_bytes", limit)
            self._write("memory.memsw.limit_in_bytes", limit, optional=True)
            self._write("memory.swappiness", 0, optional=True)
        else:
            self._write("memory.max", limit)
            self._write("memory.swap.max", 0, optional=True)

    def _write(self, name: str, value: int, optional: bool = False) -> None:
        try:
            with open(os.path.join(self.path, name), "w") as f:
                f.write(str(value))
        except OSError:
            if not optional:
                raise

    def join(self) -> None:
        """For ``preexec_fn``: move the calling (child) process into this cgroup."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def spawn(self, cmd: list[str], env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside this cgroup, its output to ``log``."""
        return subprocess.Popen(
            cmd, env=env, preexec_fn=self.join, stdout=log, stderr=subprocess.STDOUT
        )

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def working_set(self) -> int:
        return self.cgroup.read().working_set

    def oom_kills(self) -> int:
        return self.cgroup.read().oom_kills

    def major_faults(self) -> int:
        """Page faults that had to read from disk (``pgmajfault`` of ``memory.stat``): near
        its limit the kernel evicts the cgroup's file pages, the interpreter's own code too,
        and every one read back is a major fault."""
        stat = _stat(os.path.join(self.path, "memory.stat"))
        return stat.get("total_pgmajfault", stat.get("pgmajfault", 0))

    def remove(self) -> None:
        """Kill whatever is left inside, then remove the directory."""
        for _ in range(100):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for _ in range(100):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


@contextlib.contextmanager
def dyno(limit: int) -> Iterator[BenchCgroup]:
    cg = BenchCgroup(limit)
    try:
        yield cg
    finally:
        cg.remove()


class Sampler:
    """Reads a cgroup's working set every ``period`` seconds in a thread."""

    def __init__(self, cg: BenchCgroup, over: int, period: float = 0.1) -> None:
        self.cg = cg
        self.over = over
        self.period = period
        self.t0 = time.monotonic()
        self.points: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.points.append((time.monotonic() - self.t0, self.cg.working_set()))
            self._stop.wait(self.period)

    @property
    def peak(self) -> int:
        return max((v for _, v in self.points), default=0)

    @property
    def over_limit_s(self) -> float:
        """Seconds the sampled working set was at or over ``over`` (each sample = one period)."""
        return sum(self.period for _, v in self.points if v >= self.over)


@dataclass
class Result:
    """One contender's figures. ``extra`` keys follow the issue's keys on the last line."""

    name: str
    jobs_per_s: float
    lost: int
    oom_kills: int
    over_limit_s: float
    peak_bytes: int
    restarts: int
    extra: dict[str, Any] = field(default_factory=dict)
    series: list[tuple[float, int]] = field(default_factory=list, repr=False)
    rounds: list[Result] = field(default_factory=list, repr=False)

    def line(self) -> str:
        head = (
            f"contender={self.name} jobs_per_s={self.jobs_per_s:.2f} lost={self.lost} "
            f"oom_kills={self.oom_kills} over_limit_s={self.over_limit_s:.1f} "
            f"peak_bytes={self.peak_bytes} restarts={self.restarts}"
        )
        tail = " ".join(f"{k}={_fmt(v)}" for k, v in self.extra.items())
        return f"{head} {tail}".rstrip()


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def parse_lines(text: str, key: str = "contender") -> list[dict[str, Any]]:
    """The ``contender=...`` lines (``key=...``) of a bench's output, as dicts (numbers
    converted)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith(f"{key}="):
            continue
        row: dict[str, Any] = {}
        for part in line.split():
            name, _, raw = part.partition("=")
            row[name] = _number(raw)
        rows.append(row)
    return rows


def _number(raw: str) -> Any:
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            continue
    return raw


def table(
    results: Sequence[Result], columns: Sequence[tuple[str, str]], label: str = "contender"
) -> str:
    """A Markdown table: ``columns`` are (header, key) with key a Result field or extra key;
    the first column, headed ``label``, names the result."""
    head = f"| {label} | " + " | ".join(h for h, _ in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = [head, rule]
    for r in results:
        cells = []
        for _, key in columns:
            value = getattr(r, key) if hasattr(r, key) else r.extra.get(key, "")
            if key.endswith("bytes") or key == "freed":
                cells.append(format_size(int(value)) if value != "" else "")
            else:
                cells.append(_fmt(value))
        rows.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def chart(results: Sequence[Result], limit: int, hard: int, path: str, title: str) -> None:
    """Memory over time per contender, with the cgroup limit and the hard limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 1.9 * len(results) + 0.6), sharex=True)
    axes = list(axes) if len(results) > 1 else [axes]
    mib = 1024 * 1024
    for ax, r in zip(axes, results, strict=True):
        xs = [t for t, _ in r.series]
        ax.plot(xs, [v / mib for _, v in r.series], lw=0.9, color="tab:blue")
        ax.axhline(limit / mib, color="tab:red", lw=1, label="cgroup limit (OOM)")
        ax.axhline(hard / mib, color="tab:orange", lw=0.8, ls="--", label="hard limit")
        ax.set_ylabel("MiB")
        ax.set_ylim(0, limit / mib * 1.08)
        rounds = f" in {len(r.rounds)} rounds (memory: the first)" if len(r.rounds) > 1 else ""
        ax.set_title(
            f"{r.name}: lost {r.lost}, OOM kills {r.oom_kills}, restarts {r.restarts}{rounds}",
            fontsize=9,
            loc="left",
        )
    axes[0].legend(fontsize=7, loc="lower right")
    axes[-1].set_xlabel("seconds")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    """One line about where the numbers were taken."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {format_size(mem)} RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}, load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )


def descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        for kid in children_of(stack.pop()):
            if kid not in out:
                out.append(kid)
                stack.append(kid)
    return out


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Ask ``proc`` to stop with ``sig``; SIGKILL it after ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_env(**extra: str) -> dict[str, str]:
    """The environment for bench children: ours, with bench/apps and src importable."""
    env = dict(os.environ)
    path = [APPS, os.path.join(ROOT, "src")]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update(extra)
    return env


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def replace_block(path: str, name: str, text: str) -> bool:
    """Put ``text`` between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in ``path``.

    Returns False (and changes nothing) when the file or the markers are missing.
    """
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    try:
        with open(path) as f:
            doc = f.read()
    except OSError:
        return False
    i, j = doc.find(begin), doc.find(end)
    if i < 0 or j < i:
        return False
    write_text(path, doc[: i + len(begin)] + "\n" + text.strip("\n") + "\n" + doc[j:])
    return True


def share(r: Result, base: Result) -> float:
    """``r``'s throughput as a part of ``base``'s: the median of the per-round ratios when
    both ran in rounds (each round's contenders ran side by side), else the plain ratio."""
    if r.rounds and len(r.rounds) == len(base.rounds):
        return statistics.median(
            a.jobs_per_s / b.jobs_per_s if b.jobs_per_s > 0 else 0.0
            for a, b in zip(r.rounds, base.rounds, strict=True)
        )
    return r.jobs_per_s / base.jobs_per_s if base.jobs_per_s > 0 else 0.0


def runs_note(results: Sequence[Result]) -> str:
    """How the figures were taken: one run, or one run of rounds."""
    n = len(results[0].rounds) if results else 0
    if n < 2:
        return "One run."
    return (
        f"One run of {n} rounds, contenders in turn: jobs/s is the median round, peak the "
        "highest, every other figure the sum over the rounds."
    )


def headline(results: Sequence[Result], columns: Sequence[tuple[str, str]]) -> str:
    """A short table for the README, throughput also as a share of the first contender's."""
    out = [table(results, columns)]
    if len(results) > 1 and results[0].jobs_per_s > 0:
        shares = ", ".join(f"{r.name} {100 * share(r, results[0]):.0f}%" for r in results[1:])
        out.append(f"\nThroughput against {results[0].name}: {shares}.")
    out.append(f"\n{runs_note(results)} Machine: {machine()}.")
    return "\n".join(out)


def choose(
    parser: argparse.ArgumentParser,
    text: str,
    order: Sequence[str],
    why_not: Mapping[str, str | None],
) -> tuple[list[str], dict[str, str]]:
    """The contenders named in ``text`` (comma-separated), in ``order``, and those skipped
    with the reason ``why_not`` gives (a tool missing on this machine)."""
    wanted = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in order]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from {', '.join(order)}")
    skipped = {c: str(why_not[c]) for c in wanted if why_not[c]}
    return [c for c in order if c in wanted and c not in skipped], skipped


def run_each(
    names: Sequence[str], run: Callable[[str, str], Result], rounds: int = 1
) -> list[Result]:
    """``run(name, workdir)`` for each contender, ``rounds`` times in turn (each round starts
    one contender later, so no contender always runs first), in one temporary work dir,
    removed after (kept, and named, when ``BENCH_KEEP`` is set). With more than one round,
    each contender's rounds are combined (:func:`combine`)."""
    workdir = tempfile.mkdtemp(prefix="memwarden-bench-")
    per: dict[str, list[Result]] = {name: [] for name in names}
    try:
        for k in range(rounds):
            for name in [*names[k % len(names) :], *names[: k % len(names)]] if names else []:
                tag = f" (round {k + 1}/{rounds})" if rounds > 1 else ""
                print(f"# {name}{tag} ...", file=sys.stderr, flush=True)
                per[name].append(run(name, workdir))
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"# kept {workdir}", file=sys.stderr)
    return [results[0] if rounds == 1 else combine(results) for results in per.values()]


def combine(rounds: Sequence[Result]) -> Result:
    """One contender's rounds as one result: jobs/s the median, peak the highest, every
    other figure (lost, OOM kills, seconds over, restarts, counts in ``extra``) the sum;
    the chart shows the first round. The rounds themselves stay in ``rounds``."""
    first = rounds[0]
    extra: dict[str, Any] = {}
    for key in first.extra:
        values = [r.extra.get(key, 0) for r in rounds]
        extra[key] = max(values) if key.endswith("_max") else sum(values)
    extra["rounds"] = len(rounds)
    return Result(
        name=first.name,
        jobs_per_s=statistics.median(r.jobs_per_s for r in rounds),
        lost=sum(r.lost for r in rounds),
        oom_kills=sum(r.oom_kills for r in rounds),
        over_limit_s=sum(r.over_limit_s for r in rounds),
        peak_bytes=max(r.peak_bytes for r in rounds),
        restarts=sum(r.restarts for r in rounds),
        extra=extra,
        series=first.series,
        rounds=list(rounds),
    )


def publish(
    bench: str,
    text: str,
    results: Sequence[Result],
    limits: tuple[int, int],
    title: str,
    out: str | None,
    readme: str | None,
    readme_text: str,
) -> None:
    """Print the report; with ``out`` write ``bench-<bench>.md`` and ``.png`` there and the
    ``<bench>`` block of its ``benchmarks.md``; with ``readme`` its ``<bench>-headline``
    block; last, one ``key=value`` line per contender."""
    print(text)
    if out:
        write_text(os.path.join(out, f"bench-{bench}.md"), text + "\n")
        chart(results, *limits, os.path.join(out, f"bench-{bench}.png"), title)
        replace_block(os.path.join(out, "benchmarks.md"), bench, text)
    if readme:
        replace_block(readme, f"{bench}-headline", readme_text)
    print()
    for r in results:
        print(r.line())
