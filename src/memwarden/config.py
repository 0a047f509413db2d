"""Settings: every one a ``MEMWARDEN_*`` env var and a keyword argument of the same name.

Keyword arguments win over the environment, the environment over the defaults. Each field
carries its env var, kind and help text in its metadata, so ``memwarden check`` and the
README's table are made from this one list.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import os
import re
import signal
import stat
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict, cast

from memwarden.gauges import MEASURES
from memwarden.units import SettingError, parse_bool, parse_duration, parse_size

RESTARTS = ("signal", "exit", "none", "heroku", "kubernetes", "systemd")
log = logging.getLogger("memwarden")


def _setting(
    default: Any,
    kind: str,
    help: str,
    env: str | None = None,
    secret: bool = False,
    shown: str | None = None,
) -> Any:
    """A setting; ``secret`` ones (URLs that may hold a password) stay out of the repr.
    ``shown`` is the default in words where it is worked out at start (``None`` here)."""
    return field(
        default=default,
        repr=not secret,
        metadata={"kind": kind, "help": help, "env": env, "shown": shown},
    )


@dataclass(frozen=True)
class Config:
    """All of memwarden's settings, validated. Sizes stay as given until the quota is known."""

    soft_limit: str | int | None = _setting(
        None,
        "size",
        "Soft limit: over it memwarden frees memory, pauses intake, and after the grace "
        "time restarts the worker gracefully (its jobs in hand finish first)",
        shown="85% of a cgroup quota, 90% on Heroku",
    )
    hard_limit: str | int | None = _setting(
        None,
        "size",
        "Hard limit: at it memwarden kills at once, before the kernel or the platform does",
        shown="95% of a cgroup quota, 100% on Heroku",
    )
    quota: str | int | None = _setting(
        None,
        "size",
        "The memory quota, when it cannot be detected (cgroup, Heroku dyno size)",
        shown="the cgroup's limit, else the Heroku dyno size",
    )
    dyno_size: str | None = _setting(
        None,
        "text",
        "Heroku dyno size for the quota table when the cgroup shows no limit (e.g. standard-2x)",
    )
    grace: float = _setting(
        120.0,
        "duration",
        "Grace: how long memory may stay over the soft limit before a graceful restart",
    )
    shutdown_timeout: float = _setting(
        25.0,
        "duration",
        "How long a graceful stop may take before the hard kill (inside Heroku's 30 s)",
    )
    interval: float = _setting(0.1, "duration", "How often memory is read")
    alert_interval: float = _setting(
        0.02,
        "duration",
        "How often memory is read while over the soft limit (fast growth near the quota)",
    )
    min_uptime: float = _setting(
        30.0,
        "duration",
        "A restart that can wait waits until the worker has run this long; doubles per "
        "looping restart",
    )
    max_restarts: int = _setting(
        3,
        "int",
        "Looping restarts allowed per restart window: restarts of a worker lifetime (one "
        "process, from start to restart) that started at 80% of its soft limit or more",
    )
    restart_window: float = _setting(
        3600.0, "duration", "The window max_restarts and max_early_exits count in"
    )
    max_early_exits: int = _setting(
        5,
        "int",
        "memwarden run: early exits of the command (dying before min_uptime) per restart "
        "window before run gives up",
    )
    reclaim: bool = _setting(
        True, "bool", "Try to free memory (gc + malloc_trim) before any restart"
    )
    pressure_full: float | str | None = _setting(
        None,
        "percent",
        "Full memory pressure (PSI avg10 of a v2 cgroup, e.g. 40%) that, held for "
        "MEMWARDEN_PRESSURE_HOLD, runs the soft ladder under the soft limit",
        shown="off",
    )
    pressure_hold: float = _setting(
        30.0, "duration", "How long MEMWARDEN_PRESSURE_FULL must hold (systemd-oomd's 30 s)"
    )
    restart: str = _setting("signal", "choice", f"How to come back: {', '.join(RESTARTS)}")
    stop_signal: str = _setting("SIGTERM", "signal", "The graceful stop signal (signal restart)")
    drain_signal: str | None = _setting(
        None,
        "signal",
        "memwarden run: sent to the command at the soft crossing, before its stop signal: "
        "stop taking work (SIGTSTP for Sidekiq)",
    )
    exit_code: int = _setting(75, "int", "Exit status of the exit/kubernetes/systemd restarts")
    measure: str = _setting(
        "auto",
        "choice",
        "What memory is measured (the gauge): cgroup (the container's, as the platform "
        "counts it), tree (the worker and its children), process (the worker alone); auto: "
        "cgroup when the quota is the cgroup's, else tree",
    )
    journal: str | None = _setting(
        None, "path", "JSON-lines journal file, one line per job and per action", shown="none"
    )
    journal_max_bytes: int | str = _setting(
        "20MB", "size", "Rotate the journal at this size (3 old files kept)"
    )
    dry_run: bool = _setting(False, "bool", "Decide and log, never act")
    poison_kills: int = _setting(3, "int", "Hard kills a job may cause before quarantine")
    child_limit: str | int | None = _setting(
        None,
        "size",
        "A pool child's share: recycle it after a job when its USS is over this (Celery prefork)",
        shown="what the worker leaves under the soft limit before its pool starts, split "
        "between the children",
    )
    state_dir: str | None = _setting(
        None,
        "path",
        "Private directory for the host lock and restart history (0700, ours only)",
        shown="$XDG_RUNTIME_DIR/memwarden, else memwarden-<uid> in the temp dir",
    )
    heroku_api_url: str = _setting(
        "https://api.heroku.com", "url", "Heroku Platform API base URL (heroku restart)"
    )
    api_timeout: float = _setting(
        5.0,
        "duration",
        "Wall-clock limit of one try of a platform API call (Heroku, Kubernetes); the whole "
        "call, retries included, ends within the shutdown timeout",
    )
    api_retries: int = _setting(
        3, "int", "Retries of a platform API call on 429, 5xx or timeout (with back-off)"
    )
    kubernetes_delete_pod: bool = _setting(
        False,
        "bool",
        "kubernetes restart: have the pod replaced through the API (evicted, see "
        "MEMWARDEN_KUBERNETES_EVICT) instead of exiting",
    )
    kubernetes_evict: bool = _setting(
        True,
        "bool",
        "Pod deletion through the Eviction API, so PodDisruptionBudgets pace the fleet "
        "(a 429 is asked again until the shutdown timeout, then exit); false: a plain DELETE",
    )
    kubernetes_grace: float = _setting(
        30.0, "duration", "gracePeriodSeconds of the pod's eviction or deletion"
    )
    kubernetes_api_url: str | None = _setting(
        None, "url", "Kubernetes API URL", shown="https://$KUBERNETES_SERVICE_HOST:PORT"
    )
    kubernetes_sa_dir: str = _setting(
        "/var/run/secrets/kubernetes.io/serviceaccount",
        "path",
        "Service-account token, ca.crt and namespace for the pod deletion",
    )
    redis_url: str | None = _setting(
        None,
        "url",
        "Redis for fleet coordination and heartbeats",
        secret=True,
        shown="none: this host only",
    )
    fleet: str | None = _setting(
        None, "text", "Fleet name for the restart lock and status", shown="$HEROKU_APP_NAME"
    )
    fleet_max_restarting: int = _setting(
        1, "int", "At most this many workers of the fleet restart at once"
    )
    fleet_lock_ttl: float = _setting(
        30.0, "duration", "A restart holds its fleet place until this long after its warden died"
    )
    heartbeat_interval: float = _setting(
        10.0, "duration", "Heartbeat period (a warden silent for 3 periods drops from status)"
    )
    live_memory: bool = _setting(
        True,
        "bool",
        "Add live-memory figures (blocks, heap_in_use, mmapped) to job records",
    )
    trace: str | None = _setting(
        None,
        "text",
        "tracemalloc around the next runs of this job kind (or auto), one worker",
        shown="off",
    )
    trace_runs: int = _setting(5, "int", "How many runs MEMWARDEN_TRACE traces")
    metrics_port: int | None = _setting(
        None, "int", "Serve Prometheus metrics on this port (extra metrics)", shown="off"
    )
    metrics_addr: str = _setting("127.0.0.1", "text", "Address the metrics port binds to")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                VALIDATORS[f.metadata["kind"]](self, f, value)
        _validate_together(self)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Settings from ``MEMWARDEN_*`` (``env`` defaults to ``os.environ``) and keywords."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        names = {f.name: f for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in names:
                guess = closest(key, names)
                raise SettingError(
                    key,
                    overrides[key],
                    "unknown setting" + (f" (did you mean {guess}?)" if guess else ""),
                    repr(overrides[key]) if guess else "'512MB'",
                    example_setting=guess or "soft_limit",
                )
        warn_unknown(env)
        for name, f in names.items():
            if name in overrides:
                values[name] = overrides[name]
                continue
            raw = env.get(env_name(f))
            if raw is not None and raw.strip() != "":
                values[name] = _from_text(f, raw)
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    @property
    def signal_number(self) -> int:
        return int(getattr(signal, _signal_name(self.stop_signal)))

    @property
    def state_path(self) -> str:
        """The private state directory, created and checked (:mod:`memwarden.state`)."""
        from memwarden.state import locate

        return locate(self.state_dir).path

    def size(self, name: str, quota: int | None = None) -> int | None:
        value = getattr(self, name)
        return None if value is None else parse_size(value, env_name_of(name), quota)


class WardenOptions(TypedDict, total=False):
    """Every setting but ``quota`` and ``journal`` as a typed keyword: what
    :class:`~memwarden.warden.Warden` takes in ``**options`` (those two are its own
    parameters, a :class:`~memwarden.gauges.quota.Quota` or a journal object too).

    Sizes are ``"512MB"``, ``"85%"`` or bytes; durations ``"2m"``, ``"30s"`` or seconds.
    """

    soft_limit: str | int | None
    hard_limit: str | int | None
    dyno_size: str | None
    grace: str | float
    shutdown_timeout: str | float
    interval: str | float
    alert_interval: str | float
    min_uptime: str | float
    max_restarts: int
    restart_window: str | float
    max_early_exits: int
    reclaim: bool
    pressure_full: str | float | None
    pressure_hold: str | float
    restart: str
    stop_signal: str | int
    drain_signal: str | int | None
    exit_code: int
    measure: str
    journal_max_bytes: str | int
    dry_run: bool
    poison_kills: int
    child_limit: str | int | None
    state_dir: str | None
    heroku_api_url: str
    api_timeout: str | float
    api_retries: int
    kubernetes_delete_pod: bool
    kubernetes_evict: bool
    kubernetes_grace: str | float
    kubernetes_api_url: str | None
    kubernetes_sa_dir: str
    redis_url: str | None
    fleet: str | None
    fleet_max_restarting: int
    fleet_lock_ttl: str | float
    heartbeat_interval: str | float
    live_memory: bool
    trace: str | None
    trace_runs: int
    metrics_port: int | None
    metrics_addr: str


class Options(WardenOptions, total=False):
    """Every :class:`Config` setting as a typed keyword, for ``guard(app, **options)`` and
    the other integrations: ``soft_limt="1GB"`` is a type error, not a surprise at start.
    A test keeps its keys and :class:`Config`'s fields the same."""

    quota: str | int | None
    journal: str | None


def env_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("env") or "MEMWARDEN_" + f.name.upper()


def env_name_of(name: str) -> str:
    return env_name(_FIELDS[name])


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def settings_table() -> list[tuple[str, str, str, str]]:
    """(env var, kind, default, help) for every setting: the README's table."""
    return [
        (env_name(f), f.metadata["kind"], default_text(f), f.metadata["help"])
        for f in dataclasses.fields(Config)
    ]


def default_text(f: dataclasses.Field[Any] | str) -> str:
    """A setting's default as ``--help`` and the settings table show it: ``2m``, ``20MB``,
    ``on``, or in words where it is worked out at start."""
    f = _FIELDS[f] if isinstance(f, str) else f
    shown: str | None = f.metadata["shown"]
    if shown is not None:
        return shown
    if f.default is None:
        return "none"
    if f.metadata["kind"] == "duration":
        return short_duration(cast(float, f.default))
    if f.metadata["kind"] == "bool":
        return "on" if f.default else "off"
    return str(f.default)


def short_duration(seconds: float) -> str:
    """``1h``, ``2m``, ``25s``, ``0.1s``: a duration as a setting takes it."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _signal_name(value: str) -> str:
    name = value.strip().upper()
    return name if name.startswith("SIG") else "SIG" + name


def _from_text(f: dataclasses.Field[Any], raw: str) -> Any:
    kind, setting = f.metadata["kind"], env_name(f)
    if kind == "duration":
        return raw.strip()  # parsed and bounded by its validator, which shows it as given
    if kind == "bool":
        return parse_bool(raw, setting)
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            example = str(_INTS.get(f.name, (0, 0, "3"))[2])
            raise SettingError(setting, raw, "expected a whole number", example) from None
    return raw.strip()


DAY = 86400.0
YEAR = 365 * DAY
#: Durations: (lowest, highest, lowest allowed itself, example). Zero is a value where it
#: means "at once" (grace, min_uptime); a zero timeout or interval would never work.
_DURATIONS: dict[str, tuple[float, float, bool, str]] = {
    "grace": (0.0, YEAR, True, "2m"),
    "shutdown_timeout": (0.0, DAY, False, "25s"),
    "interval": (0.005, 60.0, True, "0.1"),
    "alert_interval": (0.005, 60.0, True, "0.02"),
    "min_uptime": (0.0, YEAR, True, "30s"),
    "restart_window": (0.0, YEAR, False, "1h"),
    "api_timeout": (0.0, 3600.0, False, "5s"),
    "kubernetes_grace": (0.0, DAY, True, "30s"),
    "fleet_lock_ttl": (0.1, DAY, True, "30s"),
    "heartbeat_interval": (0.05, DAY, True, "10s"),
    "pressure_hold": (0.0, DAY, False, "30s"),
}
#: Whole numbers: (lowest, highest, example).
_INTS: dict[str, tuple[int, int, str]] = {
    "max_restarts": (0, 1_000_000, "3"),
    "max_early_exits": (1, 1_000_000, "5"),
    "exit_code": (1, 255, "75"),
    "poison_kills": (1, 1_000_000, "3"),
    "trace_runs": (1, 1_000_000, "5"),
    "metrics_port": (1, 65535, "9150"),
    "api_retries": (0, 100, "3"),
    "fleet_max_restarting": (1, 1_000_000, "1"),
}
#: Sizes that cannot be a share of the quota.
_NO_PERCENT = {"quota", "journal_max_bytes"}
_MIN_JOURNAL = 1024
_URL_SCHEMES = {"redis_url": ("redis", "rediss", "unix")}
_URL_EXAMPLES = {
    "redis_url": "redis://localhost:6379/0",
    "heroku_api_url": "https://api.heroku.com",
    "kubernetes_api_url": "https://10.0.0.1:443",
}
#: Signals no process can handle: never a graceful stop, never a drain.
_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")
_FLEET = re.compile(r"^[A-Za-z0-9._@/+-]+$")


Validator = Callable[[Config, dataclasses.Field[Any], Any], None]


def _set(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    object.__setattr__(cfg, f.name, value)


def _validate_size(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    name = env_name(f)
    percent = isinstance(value, str) and value.strip().endswith("%")
    if percent and f.name in _NO_PERCENT:
        what = "the quota itself" if f.name == "quota" else "a file size"
        raise SettingError(name, value, f"{what} is not a share of the quota", "20MB")
    if percent:
        parse_size(value, name, 100)  # syntax only; the quota comes later
        return
    low = _MIN_JOURNAL if f.name == "journal_max_bytes" else 1
    if parse_size(value, name) < low:
        floor = "at least 1 KiB" if low > 1 else "above 0 (leave it unset for the default)"
        raise SettingError(name, value, f"a size {floor}", "512MB")


def _validate_duration(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    name = env_name(f)
    seconds = parse_duration(value, name)
    low, high, low_ok, example = _DURATIONS.get(f.name, (0.0, YEAR, True, "2m"))
    if seconds < low or (seconds == low and not low_ok) or seconds > high:
        lowest = f">= {low:g}s" if low_ok else f"> {low:g}s"
        raise SettingError(name, value, f"expected {lowest} and <= {high:g}s", example)
    _set(cfg, f, seconds)


def _validate_percent(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    text = str(value).strip().removesuffix("%").strip()
    try:
        share = float(text)
    except ValueError:
        share = -1.0
    if not 0 < share <= 100 or isinstance(value, bool):
        raise SettingError(env_name(f), value, "a percentage above 0 and up to 100", "40%")
    _set(cfg, f, share)


def _validate_bool(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    _set(cfg, f, parse_bool(value, env_name(f)))


def _validate_int(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    low, high, example = _INTS.get(f.name, (0, 1_000_000, "3"))
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        expected = f"a whole number from {low} to {high}"
        if f.name == "exit_code":
            expected += " (0 reads as success: no supervisor restarts on it)"
        raise SettingError(env_name(f), value, expected, example)


def _validate_choice(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    options = RESTARTS if f.name == "restart" else MEASURES
    normal = str(value).strip().lower()
    if normal not in options:
        raise SettingError(env_name(f), value, f"one of {', '.join(options)}", options[0])
    _set(cfg, f, normal)


def _validate_signal(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    name, text = env_name(f), str(value).strip()
    try:
        signum = signal.Signals(int(text)) if text.isdigit() else signal.Signals[_signal_name(text)]
    except (KeyError, ValueError):
        raise SettingError(name, value, "expected a signal name", "SIGTERM") from None
    if signum.name in _UNCATCHABLE:
        raise SettingError(name, value, "a signal the process can handle", "SIGTERM")
    _set(cfg, f, signum.name)


def _validate_url(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    name, text = env_name(f), str(value).strip()
    example = _URL_EXAMPLES.get(f.name, "https://host")
    schemes = _URL_SCHEMES.get(f.name, ("http", "https"))
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise SettingError(name, value, "not a URL", example) from None
    if parts.scheme not in schemes:
        raise SettingError(name, value, f"the scheme must be {' or '.join(schemes)}", example)
    if parts.scheme != "unix" and not parts.hostname:
        raise SettingError(name, value, "the URL names no host", example)
    if any(c.isspace() or not c.isprintable() for c in text):
        raise SettingError(name, value, "spaces or control characters in the URL", example)


def _validate_path(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    name, text = env_name(f), str(value)
    if "\0" in text or not text.strip():
        raise SettingError(name, value, "expected a path", "/var/log/memwarden.jsonl")
    if f.name == "state_dir":
        _set(cfg, f, os.path.abspath(text))
    elif f.name == "journal":
        _validate_journal(name, text)


def _validate_text(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    """Text is any text, but for the settings with a form of their own (:data:`_TEXTS`)."""
    validate = _TEXTS.get(f.name)
    if validate is not None:
        validate(cfg, f, value)


def _validate_dyno_size(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    from memwarden.gauges.quota import HEROKU_DYNO_SIZES

    shown = str(value).strip().lower()
    if shown not in HEROKU_DYNO_SIZES:
        raise SettingError(env_name(f), value, "unknown Heroku dyno size", "standard-2x")
    _set(cfg, f, shown)


def _validate_fleet(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    if not _FLEET.match(str(value).strip()):
        raise SettingError(env_name(f), value, "letters, digits and . _ @ / + - only", "shop")


def _validate_address(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
    if not _address(str(value).strip()):
        raise SettingError(env_name(f), value, "an IP address or a host name", "127.0.0.1")


#: Text settings with a form of their own.
_TEXTS: dict[str, Validator] = {
    "dyno_size": _validate_dyno_size,
    "fleet": _validate_fleet,
    "metrics_addr": _validate_address,
}
#: Kind of setting -> its validator; a validator may store the value normalised (seconds, a
#: signal's name, an absolute path).
VALIDATORS: dict[str, Validator] = {
    "size": _validate_size,
    "duration": _validate_duration,
    "percent": _validate_percent,
    "bool": _validate_bool,
    "int": _validate_int,
    "choice": _validate_choice,
    "signal": _validate_signal,
    "url": _validate_url,
    "path": _validate_path,
    "text": _validate_text,
}


def _address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return len(text) <= 253 and bool(_HOST.match(text))


def _validate_journal(name: str, path: str) -> None:
    """A journal path must be a file to be (not a directory), and a symlink there ours."""
    if os.path.isdir(path):
        raise SettingError(name, path, "a directory: name a file in it", f"{path}/memwarden.jsonl")
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode) and st.st_uid not in (os.getuid(), 0):
        raise SettingError(
            name, path, f"a symlink made by uid {st.st_uid}: refused", "/var/log/memwarden.jsonl"
        )


def _validate_together(cfg: Config) -> None:
    """Settings that are fine alone and wrong together."""
    soft, hard = cfg.soft_limit, cfg.hard_limit
    if soft is None or hard is None:
        return
    both_percent = all(isinstance(v, str) and v.strip().endswith("%") for v in (soft, hard))
    either_percent = any(isinstance(v, str) and v.strip().endswith("%") for v in (soft, hard))
    if either_percent and not both_percent:
        return  # judged once the quota is known (limits_error)
    quota = 100 if both_percent else None
    soft_b = parse_size(soft, env_name_of("soft_limit"), quota)
    hard_b = parse_size(hard, env_name_of("hard_limit"), quota)
    if hard_b < soft_b:
        raise SettingError(
            env_name_of("hard_limit"),
            hard,
            f"the hard limit must not be below MEMWARDEN_SOFT_LIMIT={soft}",
            str(soft),
        )


def limits_error(cfg: Config, soft: int, hard: int, quota: int | None) -> SettingError:
    """The error for limits that resolve to hard < soft, blaming the one the user set: the
    hard limit when both were set, else the soft one (the hard then came from the quota)."""
    from memwarden.units import format_size

    if cfg.hard_limit is not None:
        return SettingError(
            env_name_of("hard_limit"),
            cfg.hard_limit,
            f"the hard limit must not be below the soft limit ({format_size(soft)})",
            format_size(soft).replace(" ", ""),
        )
    share = f" ({format_size(hard)}: the default share of the quota {format_size(quota)})"
    return SettingError(
        env_name_of("soft_limit"),
        cfg.soft_limit,
        f"above the hard limit{share if quota else f' ({format_size(hard)})'}: set it lower, "
        "or set MEMWARDEN_HARD_LIMIT too",
        "85%",
    )


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice most like ``name`` (a typo's fix), or None."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


#: ``MEMWARDEN_*`` variables read outside :class:`Config`: ``memwarden run``'s own, and
#: the job protocol's paths it gives its command (``memwarden.command``).
OTHER_ENV = (
    "MEMWARDEN_BRAKE",
    "MEMWARDEN_JOBS",
    "MEMWARDEN_QUARANTINE",
    "MEMWARDEN_SPOOL",
)
_warned: set[str] = set()


def known_env() -> list[str]:
    """Every ``MEMWARDEN_*`` variable memwarden reads."""
    return [env_name(f) for f in dataclasses.fields(Config)] + list(OTHER_ENV)


def warn_unknown(env: Mapping[str, str]) -> list[str]:
    """Warn (once a process) about each ``MEMWARDEN_*`` variable that is no setting, naming
    the closest one: a typo is otherwise ignored in silence. Returns the unknown names."""
    known = known_env()
    unknown = sorted(k for k in env if k.startswith("MEMWARDEN_") and k not in known)
    for key in unknown:
        if key in _warned:
            continue
        _warned.add(key)
        near = closest(key, known)
        log.warning(
            "memwarden: %s is not a setting and is ignored%s",
            key,
            f" (did you mean {near}?)" if near else "",
        )
    return unknown


def settings_markdown() -> str:
    """The README's settings table, made from :class:`Config` (``make readme`` writes it)."""
    lines = ["| env var | unit | default | what it does |", "|---|---|---|---|"]
    for env, kind, default, text in settings_table():
        lines.append(f"| `{env}` | {kind} | {default} | {text} |")
    return "\n".join(lines)
