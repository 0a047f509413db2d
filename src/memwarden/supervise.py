"""``memwarden run -- CMD``: guard any worker command from outside.

The supervisor starts CMD in its own session (so its whole process group can be killed),
becomes the subreaper of its descendants (so orphans come back to it and are killed, never
left behind), measures the command with the core's gauges — the cgroup working set when the
command owns the container, else the PSS of its process tree — and lets the core's
:class:`~memwarden.policy.Policy` decide (with reclaim off: nobody can ``malloc_trim``
another process). Over the soft limit for ``grace``: the command's own stop signal, then
SIGKILL to the whole tree after ``shutdown_timeout``; over the hard limit: SIGKILL at once.
Then CMD starts again. A command that exits on its own is started again too, after a
back-off when it dies young; too many early exits in the restart window end ``run``.

Signals: SIGTERM and SIGINT are passed on to CMD once and ``run`` exits with its status.
CMD never gets more than one stop signal from us per lifetime, and none on Heroku, where
the dyno manager has already sent SIGTERM to every process of the dyno (a second SIGTERM
makes RQ, for one, abandon its job: a cold stop). SIGHUP is passed on as it comes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

import click

from memwarden.config import Config, env_name_of
from memwarden.gauges import CgroupGauge, Gauge, Sample, TreeGauge
from memwarden.gauges.cgroup import Cgroup
from memwarden.gauges.proc import children_of, process_tree, rss
from memwarden.gauges.quota import Quota, detect_quota
from memwarden.journal import Journal
from memwarden.policy import Action, Decision, Limits, Policy
from memwarden.units import SettingError, format_duration, format_size
from memwarden.warden import Pace, resolve_limits

log = logging.getLogger("memwarden.run")
F = TypeVar("F", bound=Callable[..., Any])

MAX_EARLY_EXITS_ENV = "MEMWARDEN_MAX_EARLY_EXITS"
#: A child that lives less than this (or ``min_uptime`` when longer) "died young".
YOUNG_FLOOR = 1.0
BACKOFF_FIRST = 1.0
BACKOFF_CEILING = 60.0
#: On a non-terminal the status goes to the log this often (and at every event).
PLAIN_STATUS_EVERY = 60.0
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


# --------------------------------------------------------------------- settings
@dataclass(frozen=True)
class RunSettings:
    """Everything ``run`` needs to know, resolved and validated."""

    config: Config
    quota: Quota
    limits: Limits
    cgroup: Cgroup | None
    max_early_exits: int = 5
    #: False on Heroku: the platform has already sent SIGTERM to every process.
    forward_sigterm: bool = True

    @property
    def young(self) -> float:
        return max(self.config.min_uptime, YOUNG_FLOOR)


def settings(env: Mapping[str, str] | None = None, **options: Any) -> RunSettings:
    """Settings from options (``None`` = absent), then ``MEMWARDEN_*``, then the defaults.

    Raises :class:`SettingError` naming the env var, whether the value came from it or from
    the option of the same name.
    """
    env = dict(os.environ if env is None else env)
    given = {k: v for k, v in options.items() if v is not None}
    early = given.pop("max_early_exits", None)
    if early is None:
        early = env.get(MAX_EARLY_EXITS_ENV, "").strip() or 5
    try:
        max_early = int(early)
    except (TypeError, ValueError):
        raise SettingError(
            MAX_EARLY_EXITS_ENV, early, "expected a whole number >= 1", "5"
        ) from None
    if max_early < 1:
        raise SettingError(MAX_EARLY_EXITS_ENV, early, "expected a whole number >= 1", "5")
    if "quota" in given:
        env["MEMWARDEN_QUOTA"] = str(given["quota"])
    config = Config.from_env(env, **given).replace(reclaim=False)
    cgroup = Cgroup.of_self()
    quota = detect_quota(env, cgroup)
    limits = resolve_limits(config, quota)
    if config.measure == "cgroup" and cgroup is None:
        raise SettingError(
            env_name_of("measure"), "cgroup", "this process has no memory cgroup to read", "tree"
        )
    return RunSettings(
        config=config,
        quota=quota,
        limits=limits,
        cgroup=cgroup,
        max_early_exits=max_early,
        forward_sigterm=quota.platform != "heroku",
    )


# --------------------------------------------------------------------- pure parts
@dataclass
class EarlyExits:
    """Back-off for a command that dies young, and the cap that ends ``run``.

    ``exited(uptime, now)`` returns the delay before the next start (0 for a child that
    lived long enough), or None when the cap is reached: ``cap`` early exits within
    ``window`` seconds. The delay doubles with each early exit in a row.
    """

    young: float
    cap: int
    window: float
    first: float = BACKOFF_FIRST
    ceiling: float = BACKOFF_CEILING
    in_a_row: int = 0
    times: list[float] = field(default_factory=list)

    def exited(self, uptime: float, now: float) -> float | None:
        if uptime >= self.young:
            self.in_a_row = 0
            return 0.0
        self.in_a_row += 1
        self.times = [t for t in self.times if now - t < self.window] + [now]
        if len(self.times) >= self.cap:
            return None
        return min(self.ceiling, self.first * 2 ** (self.in_a_row - 1))


def exit_status(returncode: int) -> int:
    """A shell-style status: the code, or 128 + signal for a child killed by a signal."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with status {returncode}"


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@/\s]+@")
_SECRET_NAME = re.compile(r"(token|passw|secret|api[-_]?key|credential)", re.IGNORECASE)


def redact(argv: Sequence[str]) -> list[str]:
    """The command line fit for a log or journal: URL passwords and secret-named values go.

    ``redis://:pw@host`` becomes ``redis://:***@host``; ``--token=abc`` becomes ``--token=***``
    and in ``--password abc`` the ``abc`` is replaced.
    """
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next and not arg.startswith("-"):
            out.append("***")
            hide_next = False
            continue
        hide_next = False
        name, eq, _value = arg.partition("=")
        if arg.startswith("-") and _SECRET_NAME.search(name):
            if eq:
                arg = f"{name}=***"
            else:
                hide_next = True
        out.append(_URL_PASSWORD.sub(r"\1***@", arg))
    return out


def status_text(
    total: int | None, limits: Limits, restarts: int, uptime: float, name: str = "run"
) -> str:
    """``celery  312.4 MiB / 450.0 MiB (69%)  restarts 1  up 3m05s``."""
    limit = limits.soft if limits.soft is not None else limits.hard
    if total is None:
        figure = "starting"
    elif limit:
        figure = f"{format_size(total)} / {format_size(limit)} ({100 * total / limit:.0f}%)"
    else:
        figure = f"{format_size(total)} (no limit)"
    return f"{name}  {figure}  restarts {restarts}  up {format_duration(uptime)}"


# --------------------------------------------------------------------- OS helpers
def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) == 0  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to us, not to init: we can kill and reap them."""
    return sys.platform.startswith("linux") and _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _die_with_parent(parent: int) -> Callable[[], None]:
    def preexec() -> None:  # in the child, between fork and exec
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


class ChildRssGauge:
    """RSS of the command's own process (``--measure process``)."""

    source = "process"

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def read(self) -> Sample:
        value = rss(self.pid)
        return Sample(time.time(), value, value, "process")


def child_gauge(run: RunSettings, pid: int) -> Gauge:
    measure = run.config.measure
    if measure == "auto":
        from_cgroup = run.cgroup is not None and run.quota.source.startswith("cgroup")
        measure = "cgroup" if from_cgroup else "tree"
    if measure == "cgroup" and run.cgroup is not None:
        return CgroupGauge(run.cgroup)
    if measure == "process":
        return ChildRssGauge(pid)
    return TreeGauge(pid)


class StatusLine:
    """One live line on a terminal; plain, throttled log lines elsewhere."""

    def __init__(self, stream: TextIO, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self.shown = False
        self.text = ""
        self._logged_at = -PLAIN_STATUS_EVERY

    def update(self, text: str) -> None:
        self.text = text
        if not self.enabled:
            return
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r\x1b[K" + text[:width])
            self.stream.flush()
            self.shown = True
        elif time.monotonic() - self._logged_at >= PLAIN_STATUS_EVERY:
            self._logged_at = time.monotonic()
            log.info("memwarden run: %s", text)

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def redraw(self) -> None:
        if self.tty and self.text:
            self.update(self.text)


# --------------------------------------------------------------------- the supervisor
@dataclass
class Lifetime:
    """One run of the command."""

    proc: subprocess.Popen[bytes]
    started: float  # monotonic
    gauge: Gauge
    policy: Policy
    stop_sent: int | None = None  # the stop signal we sent, at most one
    deadline: float | None = None  # SIGKILL the tree at this time
    cause: str | None = None  # why we are stopping it: "restart", "stop", "kill"
    hup_at: float | None = None
    returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def uptime(self) -> float:
        return time.monotonic() - self.started


class Supervisor:
    """Run ``argv`` under the memory guard until asked to stop. ``run()`` returns a status."""

    def __init__(
        self,
        argv: Sequence[str],
        run: RunSettings,
        *,
        journal: Journal | None = None,
        status: bool = True,
        journal_samples: bool = True,
        until: Callable[[], bool] | None = None,
        env: Mapping[str, str] | None = None,
        stream: TextIO | None = None,
        name: str | None = None,
    ) -> None:
        if not argv:
            raise ValueError("no command to run")
        self.argv = list(argv)
        self.shown = redact(self.argv)  # what logs and the journal may see
        self.settings = run
        self.config = run.config
        self.limits = run.limits
        self.journal = journal or Journal(
            self.config.journal, max_bytes=self.config.size("journal_max_bytes") or 20 * 10**6
        )
        self.journal_samples = journal_samples
        self.until = until
        self.env = dict(env) if env is not None else None
        self.name = name or os.path.basename(self.argv[0])
        self.label = name or shlex.join(self.shown)
        self.status = StatusLine(stream or sys.stderr, enabled=status)
        self.early = EarlyExits(run.young, run.max_early_exits, self.config.restart_window)
        self.child: Lifetime | None = None
        self.restart_times: list[float] = []  # memory restarts (wall clock), for the policy
        self.counts = {"starts": 0, "restarts": 0, "kills": 0, "early_exits": 0}
        self.peak = 0
        self.last_total: int | None = None
        first = self.limits.soft if self.limits.soft is not None else self.limits.hard
        self.pace = Pace(self.config, first)
        self._stopping: int | None = None  # the signal that asked us to stop
        self._pending: list[int] = []
        self._wake_r = self._wake_w = -1
        self._sigint_count = 0
        self._said_wait: str | None = None

    # ------------------------------------------------------------- public
    def run(self) -> int:
        """Supervise until asked to stop (or the early-exit cap): CMD's shell-style status."""
        become_subreaper()
        previous = self._install_signals()
        try:
            if not self.limits.enabled:
                self._say(
                    logging.WARNING,
                    "no quota and no limit found: running %s unguarded "
                    "(set --soft-limit / MEMWARDEN_SOFT_LIMIT or MEMWARDEN_QUOTA)",
                    self.name,
                )
            return self._loop()
        finally:
            self._kill_leftovers()
            self.status.clear()
            self._restore_signals(previous)
            self.journal.close()

    # ------------------------------------------------------------- the loop
    def _loop(self) -> int:
        delay = 0.0
        while True:
            if delay > 0:
                self._say(logging.INFO, "starting %s again in %s", self.name, f"{delay:g}s")
                if self._sleep(delay):
                    return exit_status(-(self._stopping or signal.SIGTERM))
            started = self._start()
            if started is not None:
                return started
            assert self.child is not None
            child = self.child
            self._supervise(child)
            assert child.returncode is not None
            self._kill_leftovers()
            if self._stopping is not None or child.cause == "stop":
                self._journal_exit(child, "stopped")
                return exit_status(child.returncode)
            if child.cause == "hup":
                self._journal_exit(child, "hung up")
                return exit_status(child.returncode)
            asked = child.cause is None and child.returncode == self.config.exit_code
            why = "restart" if child.cause in ("restart", "kill") or asked else "exited"
            self._journal_exit(child, why)
            delay_or_none = self.early.exited(child.uptime(), time.monotonic())
            if asked:
                self._say(
                    logging.INFO,
                    "%s exited with status %d after %s: a restart its own warden asked for",
                    self.name,
                    child.returncode,
                    format_duration(child.uptime()),
                )
            elif child.cause is None:
                self._say(
                    logging.WARNING,
                    "%s %s after %s",
                    self.name,
                    describe_exit(child.returncode),
                    format_duration(child.uptime()),
                )
            if delay_or_none is None:
                self.counts["early_exits"] = len(self.early.times)
                status = exit_status(child.returncode) or 1
                self._say(
                    logging.ERROR,
                    "%s died young %d times in %s (last: %s after %s): giving up with "
                    "status %d. Fix the command, or raise --max-early-exits / %s.",
                    self.name,
                    len(self.early.times),
                    format_duration(self.config.restart_window),
                    describe_exit(child.returncode),
                    format_duration(child.uptime()),
                    status,
                    MAX_EARLY_EXITS_ENV,
                )
                self.journal.write(
                    "give_up",
                    reason=f"{len(self.early.times)} early exits",
                    status=status,
                    cmd=self.shown,
                )
                return status
            self.counts["early_exits"] = len(self.early.times)
            delay = delay_or_none

    def _start(self) -> int | None:
        """Start CMD; a status when it cannot be started at all."""
        try:
            proc = subprocess.Popen(
                self.argv,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()),
                env=self.env,
            )
        except OSError as exc:
            code = 127 if exc.errno == errno.ENOENT else 126
            self._say(logging.ERROR, "cannot start %s: %s", shlex.join(self.shown), exc.strerror)
            return code
        now_wall = time.time()
        self.child = Lifetime(
            proc=proc,
            started=time.monotonic(),
            gauge=child_gauge(self.settings, proc.pid),
            policy=Policy(self.limits, started_at=now_wall, past_restarts=self.restart_times),
        )
        self.counts["starts"] += 1
        self.journal.write("start", pid=proc.pid, supervisor=os.getpid(), cmd=self.shown)
        self._say(logging.INFO, "started %s (pid %d)", self.label, proc.pid)
        return None

    def _supervise(self, child: Lifetime) -> None:
        # The first reading one interval in: at once it would measure a process still
        # exec'ing, and the policy's "over the limit from the start" alarm could never fire.
        next_sample = time.monotonic() + self.config.interval
        while True:
            now = time.monotonic()
            wake = next_sample if child.deadline is None else min(next_sample, child.deadline)
            self._wait(max(0.0, wake - now))
            self._handle_signals(child)
            if self._reap(child):
                return
            now = time.monotonic()
            if child.deadline is not None and now >= child.deadline:
                self._hard_kill(
                    child,
                    f"still running {self.config.shutdown_timeout:g}s after "
                    f"{self._signame(child.stop_sent)}",
                )
            if child.hup_at is not None and now - child.hup_at > self.config.shutdown_timeout:
                child.hup_at = None  # it took the hang-up in its stride (Celery re-execs)
                if child.cause == "hup":
                    child.cause = None
            if now >= next_sample:
                self._sample(child)
                next_sample = time.monotonic() + self._next_interval()
                if self.until is not None and self._stopping is None and self.until():
                    self._ask_to_stop(child, signal.SIGTERM, forward=True)

    def _next_interval(self) -> float:
        """As the in-process watchdog paces itself (:class:`Pace`)."""
        if self.child is None:
            return self.pace.interval_after(self.last_total or 0, 0.0)
        policy = self.child.policy
        return self.pace.interval_after(self.last_total or 0, policy.rise, policy.look_soon)

    def _sample(self, child: Lifetime) -> None:
        try:
            sample = self.pace.timed(child.gauge.read)
        except OSError as exc:
            log.debug("memwarden run: no reading: %s", exc)
            return
        if child.returncode is not None:
            return
        self.last_total = sample.total
        self.peak = max(self.peak, sample.total)
        if self.journal_samples and self.pace.record_due():
            self.journal.write(
                "sample",
                pid=child.pid,
                supervisor=os.getpid(),
                rss=sample.rss,
                total=sample.total,
                limit=self.limits.soft,
                hard=self.limits.hard,
                gauge=sample.source,
            )
        self.status.update(
            status_text(
                sample.total, self.limits, self.counts["restarts"], child.uptime(), self.name
            )
        )
        if self.limits.enabled:
            child.policy.lookahead = self._next_interval()
            self._act(child, child.policy.observe(sample.total, time.time()))

    def _act(self, child: Lifetime, decision: Decision) -> None:
        if decision.alarm:
            self._say(
                logging.ERROR,
                "%s starts at %s, over its soft limit %s: restarts cannot bring it under. "
                "Raise the limit or cut start-up memory.",
                self.name,
                format_size(decision.total),
                format_size(decision.limit),
            )
        action = decision.action
        if action is Action.RESTART and child.stop_sent is None and child.cause != "stop":
            self._graceful_restart(child, decision)
        elif action is Action.KILL:
            self._record(
                "kill", child, decision, **({"dry_run": True} if self.config.dry_run else {})
            )
            if self.config.dry_run:
                child.policy.did_kill()  # decided once per lifetime, like the in-process warden
            else:
                self._hard_kill(child, decision.reason, record=False)
        elif (
            action is Action.WAIT
            and "restarts in the last" in decision.reason
            and self._said_wait != decision.reason
        ):
            self._said_wait = decision.reason
            self._say(logging.ERROR, "%s", decision.reason)

    def _graceful_restart(self, child: Lifetime, decision: Decision) -> None:
        now = time.time()
        if self.config.dry_run:
            child.policy.did_dry_run(now)
            self._record("restart", child, decision, dry_run=True)
            return
        child.policy.did_restart(now)
        self.restart_times.append(now)
        self.counts["restarts"] += 1
        self._record("restart", child, decision)
        child.cause = "restart"
        self._send_stop(child, self.config.signal_number)

    def _record(self, event: str, child: Lifetime, decision: Decision, **extra: Any) -> None:
        self.journal.write(
            event,
            pid=child.pid,
            supervisor=os.getpid(),
            reason=decision.reason,
            action="signal" if event == "restart" else "kill",
            signal=self.config.stop_signal if event == "restart" else "SIGKILL",
            total=decision.total,
            limit=decision.limit,
            gauge=child.gauge.source,
            in_flight=[],
            uptime_s=round(child.uptime(), 3),
            **extra,
        )
        self._say(
            logging.WARNING,
            "%s%s %s (pid %d): %s",
            "DRY RUN: would " if extra.get("dry_run") else "",
            event,
            self.name,
            child.pid,
            decision.reason,
        )

    # ------------------------------------------------------------- stopping and killing
    def _send_stop(self, child: Lifetime, signum: int) -> None:
        """The one stop signal of this lifetime, then the SIGKILL deadline."""
        if child.stop_sent is None:
            child.stop_sent = signum
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)
        if child.deadline is None:
            child.deadline = time.monotonic() + self.config.shutdown_timeout

    def _hard_kill(self, child: Lifetime, reason: str, record: bool = True) -> None:
        if child.returncode is not None:
            return
        if record:
            self.journal.write(
                "kill",
                pid=child.pid,
                supervisor=os.getpid(),
                reason=reason,
                in_flight=[],
                total=self.last_total,
                limit=self.limits.hard,
                uptime_s=round(child.uptime(), 3),
            )
            self._say(logging.WARNING, "kill %s (pid %d): %s", self.name, child.pid, reason)
        child.policy.did_kill()
        self.counts["kills"] += 1
        if child.cause is None:
            child.cause = "kill"
        child.deadline = None
        kill_tree(child.pid)

    def _ask_to_stop(self, child: Lifetime | None, signum: int, forward: bool) -> None:
        self._stopping = signum
        if child is None or child.returncode is not None:
            return
        child.cause = "stop"
        if forward:
            self._send_stop(child, signum)
        elif child.deadline is None:
            child.deadline = time.monotonic() + self.config.shutdown_timeout

    def _kill_leftovers(self) -> None:
        """SIGKILL and reap every descendant still here (orphans come back to us)."""
        deadline = time.monotonic() + 10
        while True:
            self._reap(None)
            left = [p for p in process_tree(os.getpid()) if p != os.getpid()]
            if not left or time.monotonic() > deadline:
                return
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def _reap(self, child: Lifetime | None) -> bool:
        """Reap exited children; True when ``child`` (CMD) is one of them."""
        done = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            if child is not None and pid == child.pid:
                child.returncode = code
                child.proc.returncode = code
                done = True
            elif self.child is not None and pid == self.child.pid:
                self.child.returncode = code
                self.child.proc.returncode = code
        return done

    # ------------------------------------------------------------- signals
    def _install_signals(self) -> dict[int, Any]:
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            previous[signum] = signal.signal(signum, self._on_signal)
        previous[-1] = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        return previous

    def _restore_signals(self, previous: dict[int, Any]) -> None:
        signal.set_wakeup_fd(previous.pop(-1))
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum != signal.SIGCHLD:
            self._pending.append(signum)

    def _wait(self, timeout: float) -> None:
        with contextlib.suppress(InterruptedError):
            select.select([self._wake_r], [], [], timeout)
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 512):
                pass

    def _sleep(self, seconds: float) -> bool:
        """Sleep (between lifetimes); True if asked to stop meanwhile."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._wait(end - time.monotonic())
            self._handle_signals(None)
            self._reap(None)
            if self._stopping is not None:
                return True
        return False

    def _handle_signals(self, child: Lifetime | None) -> None:
        while self._pending:
            signum = self._pending.pop(0)
            name = self._signame(signum)
            alive = child is not None and child.returncode is None
            if signum == signal.SIGHUP:
                if alive:
                    assert child is not None
                    self._say(logging.INFO, "SIGHUP: passed on to %s", self.name)
                    child.hup_at = time.monotonic()
                    if child.cause is None:
                        child.cause = "hup"
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signal.SIGHUP)
                continue
            if signum == signal.SIGINT:
                self._sigint_count += 1
            if self._stopping is not None:
                if signum == signal.SIGINT and self._sigint_count >= 2 and alive:
                    assert child is not None
                    self._hard_kill(child, "second SIGINT: killing at once")
                else:
                    left = ""
                    if child is not None and child.deadline is not None:
                        left = f"; SIGKILL in {max(0.0, child.deadline - time.monotonic()):.0f}s"
                    self._say(logging.INFO, "%s: already stopping%s", name, left)
                continue
            forward, how = True, f"passed on to {self.name}"
            if signum == signal.SIGTERM and not self.settings.forward_sigterm:
                forward, how = False, "not passed on (Heroku sent it to every process)"
            if alive and child is not None and child.stop_sent is not None:
                forward, how = False, f"not passed on ({self.name} is already stopping)"
            if alive:
                self._say(
                    logging.INFO,
                    "%s: %s; exiting with its status (SIGKILL after %gs)",
                    name,
                    how,
                    self.config.shutdown_timeout,
                )
            if child is not None and child.cause == "hup":
                child.cause = None
            self._ask_to_stop(child if alive else None, signum, forward)

    @staticmethod
    def _signame(signum: int | None) -> str:
        if signum is None:
            return "-"
        try:
            return signal.Signals(signum).name
        except ValueError:
            return str(signum)

    # ------------------------------------------------------------- output
    def _say(self, level: int, msg: str, *args: Any) -> None:
        self.status.clear()
        log.log(level, "memwarden run: " + msg, *args)
        self.status.redraw()

    def _journal_exit(self, child: Lifetime, why: str) -> None:
        assert child.returncode is not None
        self.journal.write(
            "exit",
            pid=child.pid,
            supervisor=os.getpid(),
            status=exit_status(child.returncode),
            how=describe_exit(child.returncode),
            why=why,
            uptime_s=round(child.uptime(), 3),
        )


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every descendant (even those that left it)."""
    victims = process_tree(pid)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    for p in victims:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    for p in children_of(pid):  # forked between our walk and the kill
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def run_command(argv: Sequence[str], **options: Any) -> int:
    """``memwarden run`` without click: settings from options and env, then supervise."""
    return Supervisor(argv, settings(**options)).run()


# --------------------------------------------------------------------- the command
def _option(name: str, help: str, **kw: Any) -> Callable[[F], F]:
    return click.option(f"--{name}", name.replace("-", "_"), default=None, help=help, **kw)


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_option("soft-limit", "Soft limit, e.g. 450MB or 85% (MEMWARDEN_SOFT_LIMIT).")
@_option("hard-limit", "Hard limit: SIGKILL at once (MEMWARDEN_HARD_LIMIT).")
@_option("quota", "The memory quota when it cannot be detected (MEMWARDEN_QUOTA).")
@_option("grace", "How long memory may stay over the soft limit (MEMWARDEN_GRACE).")
@_option("shutdown-timeout", "From the stop signal to SIGKILL (MEMWARDEN_SHUTDOWN_TIMEOUT).")
@_option("interval", "Sampling interval (MEMWARDEN_INTERVAL).")
@_option("min-uptime", "No soft restart before this uptime (MEMWARDEN_MIN_UPTIME).")
@_option("max-restarts", "Soft restarts per window (MEMWARDEN_MAX_RESTARTS).", type=int)
@_option("restart-window", "Window of the caps (MEMWARDEN_RESTART_WINDOW).")
@_option("max-early-exits", f"Early exits per window before giving up ({MAX_EARLY_EXITS_ENV}).")
@_option("stop-signal", "CMD's graceful stop signal (MEMWARDEN_STOP_SIGNAL).")
@_option("measure", "auto, cgroup, tree or process (MEMWARDEN_MEASURE).")
@_option("journal", "JSONL journal file (MEMWARDEN_JOURNAL).")
@click.option("--dry-run", "dry_run", is_flag=True, default=None, help="Decide and log, never act.")
@click.option("--no-status", is_flag=True, help="No live status line on a terminal.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(command: tuple[str, ...], no_status: bool, **options: Any) -> None:
    """Run CMD and keep it inside its memory limit.

    memwarden run [OPTIONS] -- CMD [ARGS]...
    """
    from memwarden.cli import fail_on_setting

    try:
        resolved = settings(**options)
    except SettingError as exc:
        fail_on_setting(exc)
        return
    sys.exit(Supervisor(command, resolved, status=not no_status).run())
