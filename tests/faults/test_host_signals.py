"""Issue 15, item 11: an exception raised by the host framework's own signal handler while
our hook runs is the host's control flow — a soft time limit, a job timeout, a stop — and
goes on to the host; only the warden's own errors are logged and swallowed.

The contract each integration keeps (waiting for the integrations to wire it): a tuple
``HOST_CONTROL_FLOW`` of the framework's exceptions raised from its signal handlers, and
every hook guarded with ``swallow_but(*HOST_CONTROL_FLOW)``, never a bare ``swallow``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
import re
import signal
import time
from collections.abc import Callable
from types import ModuleType

import pytest

from memwarden.gauges.proc import self_rss
from memwarden.warden import swallow, swallow_but


def host_signal_lands_in(hook: Callable[[], object], handler: Callable[..., None]) -> dict:
    """Run ``hook`` (about 10 ms of real work) while a real SIGALRM with the host's
    ``handler`` fires 2 ms in; count where the handler's exception went."""
    seen = {"escaped": 0, "outside": 0, "rounds": 0}
    previous = signal.signal(signal.SIGALRM, handler)
    try:
        for _ in range(40):
            seen["rounds"] += 1
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.002)
                hook()
            except Exception:
                seen["escaped"] += 1
                continue
            try:
                time.sleep(0.05)  # not fired inside: it fires here
            except Exception:
                seen["outside"] += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return seen


def busy_hook() -> None:
    end = time.perf_counter() + 0.01
    while time.perf_counter() < end:
        self_rss()


def test_a_bare_swallow_eats_the_hosts_soft_time_limit(caplog):
    """The defect itself, shown with billiard's real handler: eaten as an internal error."""
    from billiard.exceptions import SoftTimeLimitExceeded
    from billiard.pool import soft_timeout_sighandler

    caplog.set_level(logging.ERROR, logger="memwarden")
    seen = host_signal_lands_in(swallow(busy_hook), soft_timeout_sighandler)
    eaten = len([r for r in caplog.records if "internal error" in r.getMessage()])
    assert eaten > 0 and seen["escaped"] == 0
    caplog.clear()
    let_through = swallow_but(SoftTimeLimitExceeded)(busy_hook)
    seen = host_signal_lands_in(let_through, soft_timeout_sighandler)
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    assert seen["escaped"] + seen["outside"] == seen["rounds"]


def _exceptions(module: str, names: list[str]) -> list[type[BaseException]]:
    found = []
    for name in names:
        mod, _, attr = name.rpartition(".")
        found.append(getattr(importlib.import_module(mod), attr))
    return found


#: integration module -> the host's control-flow exceptions that derive from Exception
#: (BaseException ones, such as Dramatiq's Interrupt or asyncio's CancelledError, are never
#: caught by the hook boundary anyway).
HOSTS = {
    "memwarden.integrations.celery": [
        "billiard.exceptions.SoftTimeLimitExceeded",
        "billiard.exceptions.TimeLimitExceeded",
        "billiard.exceptions.Terminated",
    ],
    "memwarden.integrations.rq": [
        "rq.exceptions.StopRequested",
        "rq.timeouts.JobTimeoutException",
    ],
    "memwarden.integrations.huey": ["huey.exceptions.TaskTimeout"],
    "memwarden.integrations.dramatiq": [],
    "memwarden.integrations.arq": [],
    "memwarden.integrations.taskiq": [],
    "memwarden.integrations.procrastinate": [],
    "memwarden.integrations.django": [],
}


def _source(mod: ModuleType) -> str:
    """A module's source, or a package's with all its modules' (Celery's is a package)."""
    source = inspect.getsource(mod)
    for info in pkgutil.iter_modules(getattr(mod, "__path__", [])):
        sub = importlib.import_module(f"{mod.__name__}.{info.name}")
        source += inspect.getsource(sub)
    return source


@pytest.mark.parametrize("module", sorted(HOSTS))
def test_every_integration_lets_its_hosts_control_flow_through(module: str) -> None:
    mod = importlib.import_module(module)
    declared = getattr(mod, "HOST_CONTROL_FLOW", None)
    assert declared is not None, f"{module} declares no HOST_CONTROL_FLOW"
    for exc in _exceptions(module, HOSTS[module]):
        assert any(issubclass(exc, d) for d in declared), f"{module} eats {exc.__name__}"
    bare = re.findall(r"^\s*@swallow\s*$", _source(mod), re.MULTILINE)
    assert not bare, f"{module}: {len(bare)} hooks guarded by a bare @swallow"


@pytest.mark.parametrize("module", sorted(m for m, names in HOSTS.items() if names))
def test_a_real_host_signal_inside_an_integration_guard_reaches_the_host(module, caplog):
    mod = importlib.import_module(module)
    declared = tuple(getattr(mod, "HOST_CONTROL_FLOW", ()))
    exc = _exceptions(module, HOSTS[module])[0]

    def handler(signum: int, frame: object) -> None:
        raise exc()

    caplog.set_level(logging.ERROR, logger="memwarden")
    seen = host_signal_lands_in(swallow_but(*declared)(busy_hook), handler)
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    assert seen["escaped"] > 0
