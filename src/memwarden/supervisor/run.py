"""``memwarden run -- CMD``: guard any worker command from outside.

The supervisor starts CMD in its own session (so its whole process group can be killed),
becomes the subreaper of its descendants (so orphans come back to it and are killed, never
left behind), measures the command with the core's gauges — the cgroup working set when the
command owns the container, else the PSS of its process tree — and lets the core's
:class:`~memwarden.policy.Policy` decide (with reclaim off: nobody can ``malloc_trim``
another process). Over the soft limit for ``grace``: the command's own stop signal, then
SIGKILL to the whole tree after ``shutdown_timeout``; over the hard limit: SIGKILL at once.
Then CMD starts again. A command that exits on its own is started again too, after a
back-off when it dies young; too many early exits in the restart window end ``run``. Only
exits of CMD's own count: a lifetime that ``run`` ended (restart, kill) or that the kernel's
OOM killer ended is replaced, never held against the command.

With ``--drain-signal`` (Sidekiq's TSTP: stop fetching) CMD gets that signal once at the
soft crossing, when the policy pauses intake. A drained command takes no work again, so its
stop signal follows soon: when the policy decides the restart, once memory has stopped rising
for :data:`DRAIN_QUIET` seconds (the jobs in hand are done, or at least no longer growing), and
at the latest :data:`DRAIN_WAIT` seconds after the drain. GitLab's sequence: TSTP, TERM, and
SIGKILL ``shutdown_timeout`` later.

Readings start at once and come at the alert pace while CMD starts (until its memory has
settled, at most :data:`START_WINDOW`, or until it tells of its first job); a reading is brought
forward when a fast rise would otherwise jump the soft-to-hard window between two readings.
While CMD starts only the hard limit acts; once it has settled the start reading decides
"starts over its soft limit".

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
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TextIO, TypeVar

from memwarden import redact
from memwarden.config import Config, env_name_of
from memwarden.events import Cause, cause_field
from memwarden.gauges import CgroupGauge, Gauge, Sample, TreeGauge
from memwarden.gauges.cgroup import Cgroup, tracking_dir
from memwarden.gauges.pressure import Signals
from memwarden.gauges.proc import children_of, process_tree, rss, stat_fields
from memwarden.gauges.quota import Quota
from memwarden.journal import Journal
from memwarden.pace import Pace
from memwarden.policy import Action, Decision, Limits, Policy
from memwarden.setup import set_up
from memwarden.supervisor import brake
from memwarden.supervisor.jobs import JobLedger
from memwarden.units import SettingError, format_duration, format_size
from memwarden.warden import SAY_AGAIN_AFTER

log = logging.getLogger("memwarden.run")
F = TypeVar("F", bound=Callable[..., Any])

MAX_EARLY_EXITS_ENV = env_name_of("max_early_exits")
#: A child that lives less than this (or ``min_uptime`` when longer) "died young".
YOUNG_FLOOR = 1.0
BACKOFF_FIRST = 1.0
BACKOFF_CEILING = 60.0
#: On a non-terminal the status goes to the log this often (and at every event).
PLAIN_STATUS_EVERY = 60.0
#: After the drain signal, the stop signal follows once memory has not risen (by more than
#: :data:`QUIET_RISE`) for this many seconds, and at the latest :data:`DRAIN_WAIT` after it.
DRAIN_QUIET = 1.0
DRAIN_WAIT = 10.0
#: The least time (s) between the drain signal and the stop signal, even when the restart is
#: decided at the crossing: a command handles one before the next (Sidekiq 6.4 given TSTP
#: and TERM 1 ms apart crashed in its signal loop and lost its jobs in hand).
DRAIN_GAP = 1.0
QUIET_RISE = 1024 * 1024
#: CMD is starting until its memory rises less than :data:`SETTLED_RISE` bytes/s over an
#: ``interval`` or more, and at most this long (s): then a start still rising is a grower.
START_WINDOW = 2.0
SETTLED_RISE = 4 * 1024 * 1024
#: A reading brought forward into the soft-to-hard window comes no sooner than this (s).
MIN_AIM = 0.002
#: run's own nice value where it may set it (CMD keeps the one run was started with).
RUN_NICE = -10
#: While CMD runs, the cgroup's OOM-kill counter is looked at this often (s).
OOM_LOOK_EVERY = 1.0
#: Drain signals that stop a process without a handler: SIGCONT follows the stop signal.
JOB_CONTROL = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGSTOP)
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
    #: Sent at the soft crossing, before the stop signal (None: no drain).
    drain_signal: int | None = None

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
    if "quota" in given:
        env["MEMWARDEN_QUOTA"] = str(given["quota"])
    config = Config.from_env(env, **given).replace(reclaim=False)
    brake.enabled(env)  # a bad MEMWARDEN_BRAKE fails here, at start
    where = set_up(config, env)
    cgroup, quota, limits = where.cgroup, where.quota, where.limits
    if config.measure == "cgroup" and cgroup is None:
        raise SettingError(
            env_name_of("measure"), "cgroup", "this process has no memory cgroup to read", "tree"
        )
    return RunSettings(
        config=config,
        quota=quota,
        limits=limits,
        cgroup=cgroup,
        max_early_exits=config.max_early_exits,
        forward_sigterm=quota.platform != "heroku",
        drain_signal=drain_number(config),
    )


def drain_number(config: Config) -> int | None:
    """The drain signal's number; it must not be the stop signal (that is no drain)."""
    if config.drain_signal is None:
        return None
    number = int(getattr(signal, "SIG" + config.drain_signal.strip().upper().removeprefix("SIG")))
    if number == config.signal_number:
        raise SettingError(
            env_name_of("drain_signal"),
            config.drain_signal,
            f"the drain signal must differ from the stop signal {config.stop_signal}",
            "SIGTSTP",
        )
    return number


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
    loops_in_a_row: int = 0

    def exited(self, uptime: float, now: float) -> float | None:
        if uptime >= self.young:
            self.in_a_row = 0
            return 0.0
        self.in_a_row += 1
        self.times = [t for t in self.times if now - t < self.window] + [now]
        if len(self.times) >= self.cap:
            return None
        return min(self.ceiling, self.first * 2.0 ** (self.in_a_row - 1))

    def replaced(self, loops: bool) -> float:
        """The delay before the next start after a lifetime ``run`` ended (restart, kill) or
        the kernel OOM-killed: never counted towards the cap; backed off (as early exits are)
        only when it ``loops`` (:attr:`Policy.loops`: it started near its limit already)."""
        if not loops:
            self.loops_in_a_row = 0
            return 0.0
        self.loops_in_a_row += 1
        return min(self.ceiling, self.first * 2.0 ** (self.loops_in_a_row - 1))


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


def status_text(
    total: int | None,
    limits: Limits,
    restarts: int,
    uptime: float,
    name: str = "run",
    kills: int = 0,
    oom_kills: int = 0,
) -> str:
    """``celery  312.4 MiB / 450.0 MiB (69%)  restarts 3 (1 hard kill)  OOM kills 1  up 3m05s``.

    ``restarts`` counts every lifetime ``run`` replaced (``kills`` of them by SIGKILL);
    ``oom_kills`` the kernel's kills."""
    limit = limits.soft if limits.soft is not None else limits.hard
    if total is None:
        figure = "starting"
    elif limit:
        figure = f"{format_size(total)} / {format_size(limit)} ({100 * total / limit:.0f}%)"
    else:
        figure = f"{format_size(total)} (no limit)"
    counts = f"restarts {restarts}"
    if kills:
        counts += f" ({kills} hard kill{'s' if kills > 1 else ''})"
    if oom_kills:
        counts += f"  OOM kills {oom_kills}"
    return f"{name}  {figure}  {counts}  up {format_duration(uptime)}"


# --------------------------------------------------------------------- OS helpers
def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result: int = libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0)
        return result == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to us, not to init: we can kill and reap them."""
    return sys.platform.startswith("linux") and _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def tree_sleeps(pid: int) -> bool:
    """Every process of ``pid``'s tree sleeps (state S or I): none runs or waits to run."""
    for p in process_tree(pid):
        fields = stat_fields(p)
        if fields and fields[0] not in (b"S", b"I"):
            return False
    return True


def cpu_wait(pid: int) -> float:
    """Seconds ``pid`` has spent runnable but waiting for a CPU (``schedstat``; 0 unknown)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def raise_priority() -> int | None:
    """Nice ``RUN_NICE`` for ``run`` itself where it may (root, CAP_SYS_NICE), as earlyoom
    does: on a busy machine a guard woken late loses to a runaway. The nice value before,
    for CMD to keep; None when unchanged."""
    try:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        if before <= RUN_NICE:
            return None
        os.setpriority(os.PRIO_PROCESS, 0, RUN_NICE)
        return before
    except OSError:
        return None


def _die_with_parent(
    parent: int, nice: int | None = None, cgroup: CommandCgroup | None = None
) -> Callable[[], None]:
    def preexec() -> None:  # in the child, between fork and exec
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if cgroup is not None:
            cgroup.join()
        if nice is not None:  # CMD runs at the priority run was given, not run's own
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, 0, nice)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


RUN_CGROUP_PREFIX = "memwarden-run-"


def _start_time(pid: int) -> str | None:
    """``pid``'s start time in clock ticks since boot (tells a reused pid apart), or None."""
    fields = stat_fields(pid)
    return fields[19].decode() if fields is not None and len(fields) > 19 else None


class CommandCgroup:
    """The command's tree in a child cgroup of ``run``'s own (:func:`tracking_dir`: one
    that moves no memory, so limits, readings and OOM-kill counts stay where they were),
    named after ``run`` (pid and start time): where ``run`` is SIGKILLed, its command's
    processes — escaped daemons included — are found there and killed by the next ``run``
    started beside it (:func:`clean_left_behind`). Where no child cgroup can be made,
    ``run`` relies on being the subreaper (README: Guard any command)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def make(cls, parent: str | None) -> CommandCgroup | None:
        if parent is None:
            return None
        me = os.getpid()
        path = os.path.join(parent, f"{RUN_CGROUP_PREFIX}{me}-{_start_time(me)}")
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            pass
        except OSError as exc:
            log.debug("memwarden run: no child cgroup for the command: %s", exc)
            return None
        return cls(path)

    def join(self) -> None:
        """For the command's ``preexec_fn``: move the calling process here."""
        with contextlib.suppress(OSError), open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            return []

    def remove(self) -> int:
        """SIGKILL every process left in it, then remove it; how many were killed."""
        killed: set[int] = set()
        deadline = time.monotonic() + 10
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.02)
        while time.monotonic() < deadline:
            try:
                os.rmdir(self.path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
        return len(killed)


def clean_left_behind(parent: str | None) -> int:
    """Kill what a SIGKILLed ``run`` beside us left in its command cgroup; how many."""
    if parent is None:
        return 0
    try:
        names = os.listdir(parent)
    except OSError:
        return 0
    killed = 0
    for name in names:
        if not name.startswith(RUN_CGROUP_PREFIX):
            continue
        pid, _, started = name[len(RUN_CGROUP_PREFIX) :].partition("-")
        if pid.isdigit() and _start_time(int(pid)) == started:
            continue  # its run is alive
        killed += CommandCgroup(os.path.join(parent, name)).remove()
    return killed


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

    def update(self, text: str, event: bool = False) -> None:
        """Show ``text``; off a terminal it is logged every ``PLAIN_STATUS_EVERY`` seconds,
        and at once when it follows an ``event`` (a lifetime ended)."""
        self.text = text
        if not self.enabled:
            return
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r\x1b[K" + text[:width])
            self.stream.flush()
            self.shown = True
        elif event or time.monotonic() - self._logged_at >= PLAIN_STATUS_EVERY:
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
class ChildRun:
    """One run of the command: its live process, and what the supervisor knows of it."""

    proc: subprocess.Popen[bytes]
    started: float  # monotonic
    gauge: Gauge
    policy: Policy
    stop_sent: int | None = None  # the stop signal we sent, at most one
    deadline: float | None = None  # SIGKILL the tree at this time
    cause: str | None = None  # why we are stopping it: "restart", "stop", "kill"
    hup_at: float | None = None
    returncode: int | None = None
    killed: bool = False  # by our SIGKILL
    #: Starting: readings at the alert pace, only the hard limit acts (see the module doc).
    starting: bool = True
    readings: list[tuple[float, int]] = field(default_factory=list)
    #: The drain signal, when it was sent, and the highest reading since (and its time).
    drain_sent: int | None = None
    #: A restart decided within ``DRAIN_GAP`` of the drain signal: sent once the gap is over.
    restart_due: Decision | None = None
    drained_at: float | None = None
    drain_peak: int = 0
    drain_peak_at: float = 0.0
    #: The cgroup's OOM-kill counter at the last look (None: not readable), and since when
    #: a rise of it waits to be told from CMD's own death.
    oom_seen: int | None = None
    oom_pending_since: float | None = None

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
        self.shown = redact.argv(self.argv)  # what logs and the journal may see
        self.settings = run
        self.config = run.config
        self.limits = run.limits
        self.journal = journal or Journal.of(self.config)
        self.journal_samples = journal_samples
        self.until = until
        self.env = dict(env) if env is not None else None
        self.name = name or os.path.basename(self.argv[0])
        self.label = name or shlex.join(self.shown)
        self.status = StatusLine(stream or sys.stderr, enabled=status)
        self.early = EarlyExits(run.young, run.max_early_exits, self.config.restart_window)
        self.child: ChildRun | None = None
        self.restart_times: list[float] = []  # memory restarts (wall clock), for the policy
        #: restarts: lifetimes run replaced (a restart, a hard kill, exit 75); kills: those of
        #: them ended by our SIGKILL; oom_kills: the kernel's, in our cgroup.
        self.counts = {"starts": 0, "restarts": 0, "kills": 0, "oom_kills": 0, "early_exits": 0}
        self.peak = 0
        self.last_total: int | None = None
        first = self.limits.soft if self.limits.soft is not None else self.limits.hard
        self.pace = Pace(self.config, first)
        self._stopping: int | None = None  # the signal that asked us to stop
        self._pending: list[int] = []
        self._wake_r = self._wake_w = -1
        self._sigint_count = 0
        #: The restart cap is said once per episode (over-soft since), then once a minute.
        self._capped_episode: float | None = None
        self._capped_said_at = -SAY_AGAIN_AFTER
        self._oom_looked_at = 0.0
        self._nice: int | None = None  # CMD's nice value when run raised its own priority
        self.command_cgroup: CommandCgroup | None = None
        self.brake: brake.Brake | None = None  # memory.high on the command's cgroup (v2)
        #: The jobs CMD says it runs (:mod:`memwarden.command`); None where it cannot be made.
        self.jobs: JobLedger | None = None
        #: Memory pressure (PSI) and the cgroup's memory events, for the samples.
        self.signals = Signals(run.cgroup)

    # ------------------------------------------------------------- public
    def run(self) -> int:
        """Supervise until asked to stop (or the early-exit cap): CMD's shell-style status."""
        become_subreaper()
        self._nice = raise_priority()
        tracking = tracking_dir()
        left = clean_left_behind(tracking)
        if left:
            self._say(
                logging.WARNING,
                "killed %d process(es) that a killed memwarden run left behind",
                left,
            )
        self.command_cgroup = CommandCgroup.make(tracking)
        self.brake = brake.engage(
            self.command_cgroup.path if self.command_cgroup else None, self.limits,
            self.settings.quota, self.settings.cgroup, self.journal)  # fmt: skip
        self.jobs = JobLedger.make(self.config, self.journal)
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
            if self.command_cgroup is not None:
                self.command_cgroup.remove()
            if self.brake is not None:
                self.brake.release()
            if self.jobs is not None:
                self.jobs.close()
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
            if self.jobs is not None:
                self.jobs.lifetime_ended()
            oom = self._look_for_oom_kills(child, ended=True)
            if self._stopping is not None or child.cause in ("stop", "hup"):
                self._journal_exit(child, "hung up" if child.cause == "hup" else "stopped")
                self._show_status(child, event=True)  # the last word: every count
                return exit_status(child.returncode)
            delay_or_none = self._ended(child, oom)
            if delay_or_none is None:
                return self._give_up(child)
            delay = delay_or_none

    def _ended(self, child: ChildRun, oom: bool) -> float | None:
        """Journal and say how a lifetime ended; the delay before the next start (None:
        give up). Runs we ended, and the kernel's OOM kills, never count as early exits."""
        assert child.returncode is not None
        asked = child.cause is None and child.returncode == self.config.exit_code
        # A command that leaves on its drain signal was stopped by us too.
        ours = child.cause in ("restart", "kill") or asked or child.drained_at is not None
        why = "oom_kill" if oom else ("kill" if child.cause == "kill" else "restart")
        self._journal_exit(child, why if ours or oom else "exited")
        if ours:
            self.counts["restarts"] += 1
            self.counts["kills"] += child.killed
        if asked:
            self._say(
                logging.INFO,
                "%s exited with status %d after %s: a restart its own warden asked for",
                self.name,
                child.returncode,
                format_duration(child.uptime()),
            )
        elif oom:
            self._say(
                logging.ERROR,
                "%s killed by the kernel's OOM killer after %s (the cgroup's oom_kill counter "
                "moved): the limits acted too late. Lower --soft-limit / --hard-limit, or see "
                "`memwarden diagnose`.",
                self.name,
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
        self._show_status(child, event=True)
        if ours or oom:
            return self.early.replaced(child.policy.loops)
        delay = self.early.exited(child.uptime(), time.monotonic())
        self.counts["early_exits"] = len(self.early.times)
        return delay

    def _give_up(self, child: ChildRun) -> int:
        assert child.returncode is not None
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
            cause=Cause.EARLY_EXITS.value,
            status=status,
            cmd=self.shown,
        )
        return status

    def _start(self) -> int | None:
        """Start CMD; a status when it cannot be started at all."""
        env = self.env
        if self.jobs is not None:
            self.jobs.lifetime_ended()  # what the last lifetime's processes said after it
            env = {**(os.environ if env is None else env), **self.jobs.env()}
        try:
            proc = subprocess.Popen(
                self.argv,
                start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid(), self._nice, self.command_cgroup),
                env=env,
            )
        except OSError as exc:
            code = 127 if exc.errno == errno.ENOENT else 126
            self._say(logging.ERROR, "cannot start %s: %s", shlex.join(self.shown), exc.strerror)
            return code
        now_wall = time.time()
        self.child = ChildRun(
            proc=proc,
            started=time.monotonic(),
            gauge=child_gauge(self.settings, proc.pid),
            policy=Policy(self.limits, started_at=now_wall, past_restarts=self.restart_times),
            oom_seen=self._oom_count(),
        )
        self.counts["starts"] += 1
        self.journal.write("start", pid=proc.pid, supervisor=os.getpid(), cmd=self.shown)
        self._say(logging.INFO, "started %s (pid %d)", self.label, proc.pid)
        return None

    def _supervise(self, child: ChildRun) -> None:
        # The first reading at once (Popen returns once CMD is exec'd): a runaway is seen
        # from its first moment; the start-up is judged once CMD has settled.
        next_sample = time.monotonic()
        while True:
            now = time.monotonic()
            wake = next_sample if child.deadline is None else min(next_sample, child.deadline)
            self._wait(max(0.0, wake - now))
            if self.jobs is not None:
                self.jobs.read()
            self._handle_signals(child)
            if self._reap(child):
                return
            now = time.monotonic()
            if child.deadline is not None and now >= child.deadline:
                self._hard_kill(
                    child,
                    f"still running {self.config.shutdown_timeout:g}s after "
                    f"{self._signame(child.stop_sent)}",
                    cause=Cause.SHUTDOWN_OVERRUN,
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
            if now - self._oom_looked_at >= OOM_LOOK_EVERY and self._owns_cgroup():
                self._look_for_oom_kills(child, ended=False)

    def _next_interval(self) -> float:
        """As the in-process watchdog paces itself (:class:`Pace`), at the alert pace while
        CMD starts, and sooner when a fast rise would jump the soft-to-hard window."""
        total = self.last_total or 0
        if self.child is None:
            return self.pace.interval_after(total, 0.0)
        policy = self.child.policy
        urgent = policy.look_soon or self.child.starting
        interval = self.pace.interval_after(total, policy.rise, urgent)
        return self._aim(interval, total, policy.rise)

    def _aim(self, interval: float, total: int, rise: float) -> float:
        """``interval``, or less when memory rising ``rise`` bytes/s would pass the middle of
        the soft-to-hard window before then: the next reading lands inside the window, where
        the policy projects the crossing (at 2 GiB/s a 256 MiB cgroup's window is ~20 ms)."""
        soft, hard = self.limits.soft, self.limits.hard
        if soft is None or hard is None or rise <= 0 or total >= soft:
            return interval
        due = (soft + (hard - soft) / 2 - total) / rise
        return max(MIN_AIM, due) if due < interval else interval

    def _sample(self, child: ChildRun) -> None:
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
            # The cgroup gauge's rss is run's own: not CMD's figure, so not filed under its pid.
            own = {} if sample.source == "cgroup" else {"rss": sample.rss}
            self.journal.write(
                "sample",
                pid=child.pid,
                supervisor=os.getpid(),
                **own,
                total=sample.total,
                limit=self.limits.soft,
                hard=self.limits.hard,
                gauge=sample.source,
                **self.signals.journal_fields(),
            )
        self._show_status(child)
        if not self.limits.enabled:
            return
        if child.starting and self.jobs is not None and self.jobs.in_hand:
            self._settled(child, sample.total)  # a command that takes jobs has started
        if child.starting:
            self._judge_start(child, sample.total)
        policy = child.policy
        policy.lookahead = self._next_interval()
        busy = self.jobs.busy if self.jobs is not None else None
        psi = self.signals.full10() if self.limits.pressure_full is not None else None
        self._act(child, policy.observe(sample.total, time.time(), busy=busy, pressure=psi))

    def _judge_start(self, child: ChildRun, total: int) -> None:
        """CMD is starting until it has settled: its memory rose less than ``SETTLED_RISE``
        over an interval and its processes all sleep (a process waiting for a CPU is not
        settled, only slow). The start reading then decides "starts over its soft limit".
        At most ``START_WINDOW`` of CMD's time (time spent waiting for a CPU left out): then
        it is still rising, it grows, and its first reading stays its start."""
        now = time.monotonic()
        child.readings.append((now, total))
        span = self.config.interval
        before = [r for r in child.readings if now - r[0] >= span]
        if before:
            then, was = before[-1]
            if (total - was) / (now - then) <= SETTLED_RISE and tree_sleeps(child.pid):
                self._settled(child, total)
                return
        if child.uptime() - cpu_wait(child.pid) >= START_WINDOW:
            child.starting = False
            child.readings.clear()

    def _settled(self, child: ChildRun, total: int) -> None:
        """CMD has started (its memory settled, or it told of its first job): ``total`` is
        its start, judged once."""
        child.starting = False
        child.readings.clear()
        decision = child.policy.at_start(total)
        if decision.alarm:
            self._say(
                logging.ERROR,
                "%s starts at %s, over its soft limit %s: restarts cannot bring it "
                "under. Raise the limit or cut start-up memory.",
                self.name,
                format_size(decision.total),
                format_size(decision.limit),
            )

    def _act(self, child: ChildRun, decision: Decision) -> None:
        action = decision.action
        if action is Action.KILL:
            in_flight = self._in_flight()  # one list for the record and the poison counts
            dry = {"dry_run": True} if self.config.dry_run else {}
            self._record("kill", child, decision, in_flight, **dry)
            if self.config.dry_run:
                child.policy.did_kill()  # decided once per lifetime, like the in-process warden
            else:
                self._hard_kill(child, decision.reason, in_flight, decision.cause)
            return
        if child.starting:
            return  # only the hard limit acts while CMD starts
        drainable = not decision.capped and not child.policy.starts_above
        if child.policy.paused and drainable and child.drain_sent is None:
            self._drain(child, decision)  # before the stop signal, even in the same moment
        if action is Action.RESTART and child.stop_sent is None and child.cause != "stop":
            if child.drained_at is not None and time.monotonic() - child.drained_at < DRAIN_GAP:
                child.restart_due = decision  # after the drain signal has been handled
            else:
                self._graceful_restart(child, decision)
        elif action is Action.WAIT and decision.capped:
            self._say_capped(child, decision)
        if child.drained_at is not None:
            self._after_drain(child, decision)

    def _say_capped(self, child: ChildRun, decision: Decision) -> None:
        """The restart cap, once per episode over the soft limit, then once a minute."""
        now = time.monotonic()
        episode = child.policy.over_since
        if episode == self._capped_episode and now - self._capped_said_at < SAY_AGAIN_AFTER:
            return
        self._capped_episode, self._capped_said_at = episode, now
        self._say(logging.ERROR, "%s", decision.reason)

    def _drain(self, child: ChildRun, decision: Decision) -> None:
        """The drain signal, once per lifetime, at the soft crossing (the policy paused
        intake): CMD stops taking work; its stop signal follows soon (:meth:`_after_drain`)."""
        signum = self.settings.drain_signal
        if signum is None or child.stop_sent is not None or child.cause is not None:
            return
        child.drain_sent = signum
        name = self._signame(signum)
        self.journal.write(
            "drain",
            pid=child.pid,
            supervisor=os.getpid(),
            signal=name,
            reason=decision.reason,
            **cause_field(decision.cause),
            total=decision.total,
            limit=decision.limit,
            uptime_s=round(child.uptime(), 3),
            **({"dry_run": True} if self.config.dry_run else {}),
        )
        self._say(
            logging.WARNING,
            "%sdrain %s (pid %d) with %s: %s",
            "DRY RUN: would " if self.config.dry_run else "",
            self.name,
            child.pid,
            name,
            decision.reason,
        )
        if self.config.dry_run:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signum)
        child.drained_at = child.drain_peak_at = time.monotonic()
        child.drain_peak = decision.total

    def _after_drain(self, child: ChildRun, decision: Decision) -> None:
        """A drained CMD takes no work again: its stop signal once memory has not risen for
        ``DRAIN_QUIET`` seconds, and at the latest ``DRAIN_WAIT`` after the drain."""
        assert child.drained_at is not None
        if child.stop_sent is not None or child.cause is not None:
            return
        now = time.monotonic()
        if decision.total > child.drain_peak + QUIET_RISE:
            child.drain_peak, child.drain_peak_at = decision.total, now
        since = format_duration(now - child.drained_at)
        if now - child.drained_at < DRAIN_GAP:
            return
        if child.restart_due is not None:
            self._graceful_restart(child, child.restart_due)
            return
        if now - child.drain_peak_at >= DRAIN_QUIET:
            why = f"drained {since} ago, memory no longer rising"
        elif now - child.drained_at >= DRAIN_WAIT:
            why = f"drained {since} ago"
        else:
            return
        restart = Decision(
            Action.RESTART, why, decision.total, self.limits.soft, cause=Cause.DRAINED
        )
        self._graceful_restart(child, restart)

    def _graceful_restart(self, child: ChildRun, decision: Decision) -> None:
        now = time.time()
        if self.config.dry_run:
            child.policy.did_dry_run(now)
            self._record("restart", child, decision, dry_run=True)
            return
        child.policy.did_restart(now)
        if child.policy.loops:  # only looping restarts count towards the cap and back-off
            self.restart_times.append(now)
        self._record("restart", child, decision)
        child.cause = "restart"
        self._send_stop(child, self.config.signal_number)

    def _in_flight(self) -> list[dict[str, Any]]:
        """The jobs in hand CMD has told of, its last messages read first."""
        if self.jobs is None:
            return []
        self.jobs.read()
        return self.jobs.in_flight()

    def _record(
        self,
        event: str,
        child: ChildRun,
        decision: Decision,
        in_flight: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> None:
        self.journal.write(
            event,
            pid=child.pid,
            supervisor=os.getpid(),
            reason=decision.reason,
            **cause_field(decision.cause),
            action="signal" if event == "restart" else "kill",
            signal=self.config.stop_signal if event == "restart" else "SIGKILL",
            total=decision.total,
            limit=decision.limit,
            gauge=child.gauge.source,
            in_flight=self._in_flight() if in_flight is None else in_flight,
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
    def _send_stop(self, child: ChildRun, signum: int) -> None:
        """The one stop signal of this lifetime, then the SIGKILL deadline."""
        if child.stop_sent is None:
            child.stop_sent = signum
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)
                if child.drain_sent in JOB_CONTROL:  # stopped by it if it had no handler
                    os.kill(child.pid, signal.SIGCONT)
        if child.deadline is None:
            child.deadline = time.monotonic() + self.config.shutdown_timeout

    def _hard_kill(
        self,
        child: ChildRun,
        reason: str,
        in_flight: list[dict[str, Any]] | None = None,
        cause: Cause | None = None,
    ) -> None:
        """SIGKILL CMD's tree for ``reason`` (``cause``); ``in_flight`` given: the kill is
        already journaled."""
        if child.returncode is not None:
            return
        record = in_flight is None
        if in_flight is None:
            in_flight = self._in_flight()
        if record:
            self.journal.write(
                "kill",
                pid=child.pid,
                supervisor=os.getpid(),
                reason=reason,
                **cause_field(cause),
                in_flight=in_flight,
                total=self.last_total,
                limit=self.limits.hard,
                uptime_s=round(child.uptime(), 3),
            )
            self._say(logging.WARNING, "kill %s (pid %d): %s", self.name, child.pid, reason)
        child.policy.did_kill()
        child.killed = True
        if child.cause is None:
            child.cause = "kill"
        child.deadline = None
        kill_tree(child.pid)
        if self.jobs is not None:
            self.jobs.killed(in_flight)

    def _ask_to_stop(self, child: ChildRun | None, signum: int, forward: bool) -> None:
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

    def _reap(self, child: ChildRun | None) -> bool:
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
        previous: dict[int, Any] = {}
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
        running = self.child is not None and self.child.returncode is None
        fds = [self._wake_r] + ([self.jobs.fd] if self.jobs is not None and running else [])
        with contextlib.suppress(InterruptedError):
            select.select(fds, [], [], timeout)
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

    def _handle_signals(self, child: ChildRun | None) -> None:
        """The signals received since the last look, in order, each to its handler."""
        while self._pending:
            signum = self._pending.pop(0)
            handler = self._SIGNAL_HANDLERS.get(signum, Supervisor._on_stop_signal)
            handler(self, signum, child)

    def _on_sighup(self, signum: int, child: ChildRun | None) -> None:
        """SIGHUP: passed on to a running CMD (a reload; ``memwarden run`` goes on)."""
        if child is None or child.returncode is not None:
            return
        self._say(logging.INFO, "SIGHUP: passed on to %s", self.name)
        child.hup_at = time.monotonic()
        if child.cause is None:
            child.cause = "hup"
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGHUP)

    def _on_sigint(self, signum: int, child: ChildRun | None) -> None:
        """SIGINT: stop; a second one while stopping kills CMD at once."""
        self._sigint_count += 1
        alive = child is not None and child.returncode is None
        if self._stopping is not None and self._sigint_count >= 2 and alive:
            assert child is not None
            self._hard_kill(child, "second SIGINT: killing at once", cause=Cause.INTERRUPTED)
            return
        self._on_stop_signal(signum, child)

    def _on_sigterm(self, signum: int, child: ChildRun | None) -> None:
        """SIGTERM: stop, passing it on unless it is not to be (Heroku sends it to every
        process)."""
        if self.settings.forward_sigterm:
            self._on_stop_signal(signum, child)
        else:
            how = "not passed on (Heroku sent it to every process)"
            self._on_stop_signal(signum, child, forward=False, how=how)

    def _on_stop_signal(
        self, signum: int, child: ChildRun | None, forward: bool = True, how: str | None = None
    ) -> None:
        """A signal that stops ``memwarden run``: CMD is asked to stop (the signal passed
        on when ``forward``), once; later ones only say that it is stopping."""
        name = self._signame(signum)
        if self._stopping is not None:
            left = ""
            if child is not None and child.deadline is not None:
                left = f"; SIGKILL in {max(0.0, child.deadline - time.monotonic()):.0f}s"
            self._say(logging.INFO, "%s: already stopping%s", name, left)
            return
        how = f"passed on to {self.name}" if how is None else how
        alive = child is not None and child.returncode is None
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

    #: One handler per signal; any other asks CMD to stop.
    _SIGNAL_HANDLERS: ClassVar[dict[int, Callable[[Supervisor, int, ChildRun | None], None]]] = {
        signal.SIGHUP: _on_sighup,
        signal.SIGINT: _on_sigint,
        signal.SIGTERM: _on_sigterm,
    }

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

    def _show_status(self, child: ChildRun, event: bool = False) -> None:
        text = status_text(
            self.last_total,
            self.limits,
            self.counts["restarts"],
            child.uptime(),
            self.name,
            kills=self.counts["kills"],
            oom_kills=self.counts["oom_kills"],
        )
        self.status.update(text, event=event)

    # ------------------------------------------------------------- the kernel's OOM kills
    def _owns_cgroup(self) -> bool:
        """The quota is our cgroup's limit: its OOM kills are CMD's."""
        return self.settings.cgroup is not None and self.settings.quota.source.startswith("cgroup")

    def _oom_count(self) -> int | None:
        """OOM kills in our cgroup, CMD's own child cgroup included."""
        cgroup = self.settings.cgroup
        if cgroup is None:
            return None
        try:
            return cgroup.read().oom_kills
        except (OSError, ValueError):
            return None

    def _look_for_oom_kills(self, child: ChildRun, ended: bool) -> bool:
        """Journal (``oom_kill``), count and say the OOM kills in our cgroup since the last
        look. True when CMD itself ``ended`` by one: SIGKILL, not ours, the counter moved."""
        now = self._oom_looked_at = time.monotonic()
        count, before = self._oom_count(), child.oom_seen
        if count is None or before is None or count <= before:
            child.oom_seen, child.oom_pending_since = count, None
            return False
        if not ended:
            # CMD itself may be the victim, still exiting: its end will say so. Kills that
            # CMD outlives by a look were another process's.
            if child.oom_pending_since is None:
                child.oom_pending_since = now
            if now - child.oom_pending_since < OOM_LOOK_EVERY:
                return False
        child.oom_seen, child.oom_pending_since = count, None
        new = count - before
        cmd = ended and child.returncode == -signal.SIGKILL and not child.killed
        if not cmd and not self._owns_cgroup():
            return False  # a cgroup shared with others: their OOM kills are not CMD's
        self.counts["oom_kills"] += new
        assert self.settings.cgroup is not None
        self.journal.write(
            "oom_kill",
            pid=child.pid,
            supervisor=os.getpid(),
            kills=new,
            oom_kills=count,
            victim="command" if cmd else "a process of the command",
            cgroup=self.settings.cgroup.path,
            limit=self.settings.quota.limit,
            total=self.last_total,
            uptime_s=round(child.uptime(), 3),
        )
        if not cmd:
            self._say(
                logging.ERROR,
                "the kernel's OOM killer killed %d process(es) of %s (pid %d) in its cgroup: "
                "the limits acted too late. Lower --soft-limit / --hard-limit.",
                new,
                self.name,
                child.pid,
            )
        return cmd

    def _journal_exit(self, child: ChildRun, why: str) -> None:
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
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)  # first: a runaway must stop growing now
    victims = process_tree(pid)
    for p in victims:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    for p in children_of(pid):  # forked between our walk and the kill
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def run_command(argv: Sequence[str], **options: Any) -> int:
    """``memwarden run`` without click: settings from options and env, then supervise."""
    return Supervisor(argv, settings(**options)).run()
