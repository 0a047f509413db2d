"""Settings: every one a ``MEMWARDEN_*`` env var and a keyword argument of the same name.

Keyword arguments win over the environment, the environment over the defaults. Each field
carries its env var, kind and help text in its metadata, so ``memwarden check`` and the
README's table are made from this one list.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memwarden.gauges import MEASURES
from memwarden.units import SettingError, parse_bool, parse_duration, parse_size

RESTARTS = ("signal", "exit", "none", "heroku", "kubernetes", "systemd")


def _setting(
    default: Any, kind: str, help: str, env: str | None = None, secret: bool = False
) -> Any:
    """A setting; ``secret`` ones (URLs that may hold a password) stay out of the repr."""
    return field(
        default=default, repr=not secret, metadata={"kind": kind, "help": help, "env": env}
    )


@dataclass(frozen=True)
class Config:
    """All of memwarden's settings, validated. Sizes stay as given until the quota is known."""

    soft_limit: str | int | None = _setting(
        None,
        "size",
        "Soft limit: reclaim, then restart after grace. Default 85% of a cgroup "
        "quota, 90% on Heroku",
    )
    hard_limit: str | int | None = _setting(
        None, "size", "Hard limit: act at once. Default 95% of a cgroup quota, 100% on Heroku"
    )
    quota: str | int | None = _setting(
        None, "size", "The memory quota, when it cannot be detected (cgroup, Heroku dyno size)"
    )
    dyno_size: str | None = _setting(
        None,
        "text",
        "Heroku dyno size for the quota table when the cgroup shows no limit (e.g. standard-2x)",
    )
    grace: float = _setting(120.0, "duration", "How long memory may stay over the soft limit")
    shutdown_timeout: float = _setting(
        25.0, "duration", "Drain time before the hard kill (inside Heroku's 30 s)"
    )
    interval: float = _setting(0.1, "duration", "Watchdog sampling interval")
    alert_interval: float = _setting(
        0.02, "duration", "Watchdog interval while over the soft limit (fast growth near the quota)"
    )
    min_uptime: float = _setting(
        30.0, "duration", "No soft restart before this uptime; doubles per recent restart"
    )
    max_restarts: int = _setting(3, "int", "Soft restarts allowed per restart window")
    restart_window: float = _setting(3600.0, "duration", "Window for max_restarts")
    reclaim: bool = _setting(True, "bool", "Try gc + malloc_trim before any restart")
    restart: str = _setting("signal", "choice", f"How to come back: {', '.join(RESTARTS)}")
    stop_signal: str = _setting("SIGTERM", "signal", "The graceful stop signal (signal restart)")
    exit_code: int = _setting(75, "int", "Exit status of the exit/kubernetes/systemd restarts")
    measure: str = _setting("auto", "choice", f"What to measure: {', '.join(MEASURES)}")
    journal: str | None = _setting(None, "path", "JSONL journal file (none: no journal)")
    journal_max_bytes: int | str = _setting(
        "20MB", "size", "Rotate the journal at this size (3 old files kept)"
    )
    dry_run: bool = _setting(False, "bool", "Decide and log, never act")
    poison_kills: int = _setting(3, "int", "Hard kills a job may cause before quarantine")
    child_limit: str | int | None = _setting(
        None,
        "size",
        "A pool child's share: recycle it after a job when its USS is over this "
        "(Celery prefork; default: what the worker leaves under the soft limit before its "
        "pool starts, split between the children)",
    )
    state_dir: str | None = _setting(
        None, "path", "Host lock and restart history (default: the temp dir)"
    )
    heroku_api_url: str = _setting(
        "https://api.heroku.com", "url", "Heroku Platform API base URL (heroku restart)"
    )
    api_timeout: float = _setting(
        5.0, "duration", "Timeout of one platform API call (Heroku, Kubernetes)"
    )
    api_retries: int = _setting(
        3, "int", "Retries of a platform API call on 429, 5xx or timeout (with back-off)"
    )
    kubernetes_delete_pod: bool = _setting(
        False, "bool", "kubernetes restart: delete the pod through the API instead of exiting"
    )
    kubernetes_grace: float = _setting(30.0, "duration", "gracePeriodSeconds of the pod deletion")
    kubernetes_api_url: str | None = _setting(
        None, "url", "Kubernetes API URL (default: https://$KUBERNETES_SERVICE_HOST:PORT)"
    )
    kubernetes_sa_dir: str = _setting(
        "/var/run/secrets/kubernetes.io/serviceaccount",
        "path",
        "Service-account token, ca.crt and namespace for the pod deletion",
    )
    redis_url: str | None = _setting(
        None, "url", "Redis for fleet coordination and heartbeats (none: host only)", secret=True
    )
    fleet: str | None = _setting(
        None, "text", "Fleet name for the restart lock and status (default: $HEROKU_APP_NAME)"
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
        True, "bool", "Add live-memory figures (blocks, heap_in_use) to job records"
    )
    trace: str | None = _setting(
        None, "text", "tracemalloc around the next runs of this job kind (or auto), one worker"
    )
    trace_runs: int = _setting(5, "int", "How many runs MEMWARDEN_TRACE traces")
    metrics_port: int | None = _setting(
        None, "int", "Serve Prometheus metrics on this port (extra metrics)"
    )
    metrics_addr: str = _setting("127.0.0.1", "text", "Address the metrics port binds to")

    def __post_init__(self) -> None:
        check = _validators()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                check.get(f.metadata["kind"], lambda *_: None)(self, f, value)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Settings from ``MEMWARDEN_*`` (``env`` defaults to ``os.environ``) and keywords."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        names = {f.name: f for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in names:
                raise SettingError(key, overrides[key], "unknown setting", "soft_limit='512MB'")
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
        return self.state_dir or os.path.join(tempfile.gettempdir(), f"memwarden-{os.getuid()}")

    def size(self, name: str, quota: int | None = None) -> int | None:
        value = getattr(self, name)
        return None if value is None else parse_size(value, env_name_of(name), quota)


def env_name(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("env") or "MEMWARDEN_" + f.name.upper()


def env_name_of(name: str) -> str:
    return env_name({f.name: f for f in dataclasses.fields(Config)}[name])


def settings_table() -> list[tuple[str, str, str, str]]:
    """(env var, kind, default, help) for every setting: the README's table."""
    rows = []
    for f in dataclasses.fields(Config):
        default = "-" if f.default is None else str(f.default)
        if f.metadata["kind"] == "duration" and f.default is not None:
            default = f"{f.default:g} s"
        rows.append((env_name(f), f.metadata["kind"], default, f.metadata["help"]))
    return rows


def _signal_name(value: str) -> str:
    name = value.strip().upper()
    return name if name.startswith("SIG") else "SIG" + name


def _from_text(f: dataclasses.Field[Any], raw: str) -> Any:
    kind, setting = f.metadata["kind"], env_name(f)
    if kind == "duration":
        return parse_duration(raw, setting)
    if kind == "bool":
        return parse_bool(raw, setting)
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise SettingError(setting, raw, "expected a whole number", "3") from None
    return raw.strip()


def _validators() -> dict[str, Any]:
    def size(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
        if isinstance(value, str) and value.strip().endswith("%"):
            parse_size(value, env_name(f), 100)  # syntax only; the quota comes later
        else:
            parse_size(value, env_name(f))

    def duration(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
        object.__setattr__(cfg, f.name, parse_duration(value, env_name(f)))

    def boolean(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
        object.__setattr__(cfg, f.name, parse_bool(value, env_name(f)))

    def integer(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SettingError(env_name(f), value, "expected a whole number >= 0", "3")

    def choice(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
        options = RESTARTS if f.name == "restart" else MEASURES
        if value not in options:
            raise SettingError(env_name(f), value, f"one of {', '.join(options)}", options[0])

    def sig(cfg: Config, f: dataclasses.Field[Any], value: Any) -> None:
        if not isinstance(getattr(signal, _signal_name(str(value)), None), int):
            raise SettingError(env_name(f), value, "expected a signal name", "SIGTERM")

    return {
        "size": size,
        "duration": duration,
        "bool": boolean,
        "int": integer,
        "choice": choice,
        "signal": sig,
    }


def settings_markdown() -> str:
    """The README's settings table, made from :class:`Config` (``make readme`` writes it)."""
    lines = ["| env var | unit | default | what it does |", "|---|---|---|---|"]
    for env, kind, default, text in settings_table():
        lines.append(f"| `{env}` | {kind} | {default} | {text} |")
    return "\n".join(lines)
