"""Fleet coordination in Redis: rolling restarts and heartbeats (``MEMWARDEN_REDIS_URL``).

**Restart lock** — at most K (``MEMWARDEN_FLEET_MAX_RESTARTING``) workers of one fleet
restart at once. The holders are a sorted set ``memwarden:{fleet}:restarting`` of tokens
(``host:pid:random``) scored by their lease's end in Redis's own clock; acquiring, renewing
and releasing are Lua scripts, so the count check and the insert are one step and only the
owner of a token can renew or remove it. A holder renews its lease every TTL/3 while it
lives; a holder that dies (SIGKILL, lost node) stops renewing and its place frees itself
within the TTL — the replacement has that long to boot before the next worker drains. A
worker that finds the fleet full keeps serving and asks again at its next check. The hard
limit never asks.

**Heartbeats** — every ``MEMWARDEN_HEARTBEAT_INTERVAL`` each warden writes
``memwarden:{fleet}:warden:{host}:{pid}`` (JSON: host, pid, framework, memory, limits,
state, restarts in the last hour, last culprit job) with a TTL of three intervals, so a
dead warden drops out of ``memwarden status`` on its own.

**Redis down** — nothing waits on it: short socket timeouts, and after a failure Redis is
left alone for a while. The lock then lets the local decision through (the host lock still
holds), heartbeats pause; both are logged once, and once more when Redis is back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from memwarden import redact
from memwarden.events import state_of
from memwarden.units import SettingError

if TYPE_CHECKING:
    from memwarden.config import Config
    from memwarden.warden import Warden

log = logging.getLogger("memwarden")

PREFIX = "memwarden"
#: How long Redis is left alone after a failure.
RETRY_AFTER = 10.0
#: Socket timeouts: a Redis that does not answer must not hold up a job's after-hook.
SOCKET_TIMEOUT = 0.5

# KEYS[1] = holders zset. ARGV: token, k, ttl_ms. Server clock, so hosts may disagree on time.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
  return 1
end
return 0
"""
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not until_ or tonumber(until_) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""
_RELEASE = "return redis.call('ZREM', KEYS[1], ARGV[1])"


def worker_host(env: Mapping[str, str]) -> str:
    """The name people know this worker by: the dyno, the pod, or the host."""
    return env.get("DYNO") or env.get("POD_NAME") or env.get("HOSTNAME") or socket.gethostname()


def fleet_name(config: Config, env: Mapping[str, str]) -> str:
    return config.fleet or env.get("HEROKU_APP_NAME") or "default"


def holders_key(fleet: str) -> str:
    return f"{PREFIX}:{fleet}:restarting"


def heartbeat_key(fleet: str, host: str, pid: int) -> str:
    return f"{PREFIX}:{fleet}:warden:{host}:{pid}"


def connect(url: str) -> Any:
    """A Redis client that gives up quickly (the ``redis`` extra)."""
    import redis

    return redis.Redis.from_url(
        url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT
    )


class Link:
    """Redis, or not: runs calls, remembers a failure for :data:`RETRY_AFTER`, logs changes."""

    def __init__(self, client: Any, where: str) -> None:
        self.client = client
        self.where = where
        self._down_until = 0.0
        self._said_down = False
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        return time.monotonic() >= self._down_until

    def run(self, fn: Callable[[], Any], default: Any) -> Any:
        if not self.up:
            return default
        try:
            value = fn()
        except Exception as exc:  # redis errors, and whatever a broken connection raises
            with self._lock:
                self._down_until = time.monotonic() + RETRY_AFTER
                if not self._said_down:
                    self._said_down = True
                    log.error(
                        "memwarden: Redis %s unreachable (%s): fleet coordination off, "
                        "local decisions go on",
                        self.where,
                        type(exc).__name__,
                    )
            return default
        if self._said_down:
            with self._lock:
                self._said_down = False
            log.warning("memwarden: Redis %s is back: fleet coordination on", self.where)
        return value


class FleetLock:
    """A :class:`~memwarden.coordination.RestartLock` held by at most ``k`` of a fleet."""

    def __init__(
        self,
        link: Link,
        fleet: str,
        *,
        k: int = 1,
        ttl: float = 30.0,
        identity: str | None = None,
        max_hold: float | None = None,
    ) -> None:
        if k < 1:
            raise SettingError(
                "MEMWARDEN_FLEET_MAX_RESTARTING", k, "at least one worker must be let through", "1"
            )
        self.link = link
        self.fleet = fleet
        self.k = k
        self.ttl_ms = max(int(ttl * 1000), 100)
        #: Renew for at most this long: a holder stuck alive must not block the fleet forever.
        self.max_hold = max_hold
        self.key = holders_key(fleet)
        self.token = f"{identity or f'{socket.gethostname()}:{os.getpid()}'}:{uuid.uuid4().hex[:8]}"
        self.held = False
        self._said_full = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"FleetLock(fleet={self.fleet!r}, k={self.k}, ttl={self.ttl_ms / 1000:g}s)"

    def _eval(self, script: str, *args: Any) -> Any:
        return self.link.client.eval(script, 1, self.key, *args)

    def try_acquire(self) -> bool:
        if not self.link.up:
            return True  # Redis is down: the local decision stands
        got = self.link.run(lambda: self._eval(_ACQUIRE, self.token, self.k, self.ttl_ms), None)
        if got is None:
            return True
        if not got:
            if not self._said_full:  # once per wait, not at every check
                self._said_full = True
                log.info(
                    "memwarden: %d of fleet %s already restarting; still serving, will ask again",
                    self.k,
                    self.fleet,
                )
            return False
        self._said_full = False
        self.held = True
        self._start_renewing()
        return True

    def release(self) -> None:
        self._stop.set()
        if self.held:
            self.held = False
            self.link.run(lambda: self._eval(_RELEASE, self.token), None)

    def _start_renewing(self) -> None:
        if self._renewer is not None and self._renewer.is_alive():
            return
        self._stop.clear()
        self._renewer = threading.Thread(
            target=self._renew_loop, name="memwarden-fleet-lease", daemon=True
        )
        self._renewer.start()

    def _renew_loop(self) -> None:
        until = None if self.max_hold is None else time.monotonic() + self.max_hold
        while not self._stop.wait(self.ttl_ms / 3000):
            if until is not None and time.monotonic() > until:
                log.error(
                    "memwarden: still restarting %gs after taking a fleet place: letting it go",
                    self.max_hold,
                )
                return
            kept = self.link.run(lambda: self._eval(_RENEW, self.token, self.ttl_ms), None)
            if kept == 0:
                log.warning("memwarden: lost the fleet restart place of %s (expired)", self.fleet)
                self.held = False
                return


def warden_state(warden: Warden, host: str) -> dict[str, Any]:
    """What a heartbeat says about ``warden``."""
    now = time.time()
    sample = warden.last_sample
    policy, limits = warden.policy, warden.limits
    return {
        "host": host,
        "pid": os.getpid(),
        "framework": warden.framework,
        "memory": None if sample is None else sample.total,
        "gauge": warden.gauge.source,
        "soft_limit": limits.soft,
        "hard_limit": limits.hard,
        "quota": warden.quota.limit,
        "state": policy.state(None if sample is None else sample.total).value,
        "dry_run": warden.config.dry_run,
        "restarts_1h": sum(1 for t in warden.history.load() if now - t < 3600),
        "last_culprit": warden.last_culprit,
        "jobs": warden.counts["jobs"],
        "oom_kills": warden.counts.get("oom_kills", 0),
        **_pressure(warden),
        "uptime_s": round(now - policy.started_at, 1),
        "ts": round(now, 3),
    }


def _pressure(warden: Warden) -> dict[str, Any]:
    """Memory pressure for the heartbeat: some and full over 10 s (percent), and whose."""
    signals = getattr(warden, "signals", None)
    psi = signals.pressure() if signals is not None else None
    if psi is None:
        return {}
    return {"psi_some10": psi.some[0], "psi_full10": psi.full[0], "psi_src": psi.source}


class Heartbeat:
    """A thread that publishes ``snapshot()`` every ``interval`` with a 3-interval TTL."""

    def __init__(
        self, link: Link, key: str, interval: float, snapshot: Callable[[], dict[str, Any]]
    ) -> None:
        self.link = link
        self.key = key
        self.interval = max(interval, 0.05)
        self.snapshot = snapshot
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> bool:
        try:
            data = json.dumps(self.snapshot(), default=str)
        except Exception:
            log.exception("memwarden: heartbeat snapshot failed")
            return False
        ttl_ms = int(self.interval * 3000)
        return bool(self.link.run(lambda: self.link.client.set(self.key, data, px=ttl_ms), False))

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="memwarden-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self.beat()
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        self.link.run(lambda: self.link.client.delete(self.key), None)


class Fleet:
    """The fleet-wide part of a warden: its restart lock and its heartbeat."""

    def __init__(self, link: Link, name: str, host: str, config: Config) -> None:
        self.link = link
        self.name = name
        self.host = host
        self.config = config
        self.lock = FleetLock(
            link,
            name,
            k=config.fleet_max_restarting,
            ttl=config.fleet_lock_ttl,
            identity=f"{host}:{os.getpid()}",
            # drain + restart + the hard kill after it: a restart never takes longer
            max_hold=2 * config.shutdown_timeout + config.fleet_lock_ttl,
        )
        self.heartbeat: Heartbeat | None = None

    @classmethod
    def from_config(cls, config: Config, env: Mapping[str, str]) -> Fleet | None:
        """The fleet, or None without ``MEMWARDEN_REDIS_URL`` (or without the redis package)."""
        if not config.redis_url:
            return None
        try:
            client = connect(config.redis_url)
        except ImportError:
            log.error(
                "memwarden: MEMWARDEN_REDIS_URL is set but the redis package is missing "
                "(pip install memwarden[redis]): fleet coordination off"
            )
            return None
        except ValueError as exc:
            raise SettingError(
                "MEMWARDEN_REDIS_URL",
                redact.url(config.redis_url),
                redact.text(str(exc), known=[config.redis_url]),
                "redis://host:6379/0",
            ) from None
        link = Link(client, redact.url(config.redis_url))
        return cls(link, fleet_name(config, env), worker_host(env), config)

    def __repr__(self) -> str:
        return f"Fleet({self.name!r}, redis={self.link.where!r}, {self.lock!r})"

    def start(self, warden: Warden) -> None:
        if self.heartbeat is None:
            self.heartbeat = Heartbeat(
                self.link,
                heartbeat_key(self.name, self.host, os.getpid()),
                self.config.heartbeat_interval,
                lambda: {"fleet": self.name, **warden_state(warden, self.host)},
            )
        self.heartbeat.start()

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()


def checks(config: Config, env: Mapping[str, str]) -> list[str]:
    """``memwarden check``: does the fleet's Redis answer?"""
    if not config.redis_url:
        return []
    where = redact.url(config.redis_url)
    try:
        connect(config.redis_url).ping()
    except ImportError:
        return [
            "MEMWARDEN_REDIS_URL is set but the redis package is missing: "
            "pip install memwarden[redis]"
        ]
    except Exception as exc:
        return [
            f"MEMWARDEN_REDIS_URL={where} does not answer ({type(exc).__name__}): "
            "no rolling restarts, no heartbeats (workers decide alone)"
        ]
    return []


def read_fleet(client: Any, fleet: str | None = None) -> dict[str, Any]:
    """Live wardens (from heartbeats) and restart holders, for ``memwarden status``."""
    pattern = f"{PREFIX}:{fleet or '*'}:warden:*"
    keys = sorted(client.scan_iter(match=pattern, count=500))
    wardens, malformed = [], 0
    for raw in client.mget(keys) if keys else []:
        if raw is None:
            continue  # expired between SCAN and MGET
        beat = heartbeat_of(raw)
        if beat is None:
            malformed += 1
        else:
            wardens.append(beat)
    now_ms = _server_ms(client)
    restarting: dict[str, list[str]] = {}
    names = {w.get("fleet") for w in wardens} | ({fleet} if fleet else set())
    for key in client.scan_iter(match=f"{PREFIX}:{fleet or '*'}:restarting", count=500):
        name = key.decode() if isinstance(key, bytes) else key
        names.add(name[len(PREFIX) + 1 : -len(":restarting")])
    for name in sorted(n for n in names if n):
        live = client.zrangebyscore(holders_key(name), now_ms, "+inf")
        if live:
            restarting[name] = [m.decode() if isinstance(m, bytes) else m for m in live]
    wardens.sort(key=lambda w: (str(w.get("fleet")), str(w.get("host")), w.get("pid") or 0))
    return {"wardens": wardens, "restarting": restarting, "malformed": malformed}


#: Heartbeat fields and the JSON types they must have (None is always allowed).
_NUMBERS: tuple[str, ...] = ("memory", "soft_limit", "hard_limit", "quota", "uptime_s", "ts")
_NUMBERS += ("psi_some10", "psi_full10")
_WHOLE = ("pid", "restarts_1h", "jobs")
_TEXTS = ("fleet", "host", "framework", "state", "last_culprit", "gauge", "psi_src")


def heartbeat_of(raw: bytes | str) -> dict[str, Any] | None:
    """A heartbeat as ``status`` can show it, or None when it is malformed (not JSON, not
    an object, a field of the wrong type): another writer's key, a hand edit, a bug."""
    try:
        beat = json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        return None
    if not isinstance(beat, dict):
        return None
    for key in _NUMBERS + _WHOLE + _TEXTS:
        value = beat.get(key)
        if value is None:
            continue
        if key in _TEXTS:
            ok = isinstance(value, str)
        elif key in _WHOLE:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and math.isfinite(value)
        if not ok:
            return None
    if beat.get("state") is not None:
        beat["state"] = state_of(beat["state"])
    return beat


def _server_ms(client: Any) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000
