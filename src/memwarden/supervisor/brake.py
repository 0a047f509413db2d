"""``memory.high`` as a brake for ``memwarden run`` (cgroup v2).

Where the quota is a v2 cgroup's ``memory.max`` and ``run``'s command has a child cgroup
that can take the memory controller, ``run`` sets that cgroup's ``memory.high`` a little
under the hard limit (:func:`level`). Past it the kernel throttles the command's
allocations (reclaim, then sleeps that grow with the overage) instead of letting a runaway
reach ``memory.max``, where the OOM killer acts: the warden has time to restart it.

A child cgroup gets the memory controller only from a parent without processes of its own
(cgroup v2's "no internal processes" rule). When ``run`` is alone in its cgroup (the main
process of a systemd unit with ``Delegate=yes``, the first process of a container that
owns its cgroup) it moves itself into a leaf beside its command's (``memwarden-sup-*``)
and enables ``memory`` for its cgroup's children; on its way out it undoes both. The
limit, readings and OOM-kill counts stay those of ``run``'s cgroup: v2 counts its
children's memory and events in its own. Elsewhere (cgroup v1, other processes beside
``run``, a read-only cgroup tree) there is no brake, and ``run`` works as before.

``MEMWARDEN_BRAKE=off`` leaves ``memory.high`` alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memwarden.units import SettingError, format_size

if TYPE_CHECKING:
    from memwarden.gauges.cgroup import Cgroup
    from memwarden.gauges.quota import Quota
    from memwarden.journal import Journal
    from memwarden.policy import Limits

log = logging.getLogger("memwarden.run")

BRAKE_ENV = "MEMWARDEN_BRAKE"
#: ``memory.high`` is this share of the hard limit (and never above ``memory.max``, never
#: below the soft limit): over the soft limit the ladder starts; past the brake a runaway
#: crawls towards the hard limit, where the warden kills it, never the kernel.
HIGH_SHARE = 0.98
SUPERVISOR_PREFIX = "memwarden-sup-"


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """``MEMWARDEN_BRAKE``: on (the default) or off; anything else is a SettingError."""
    env = os.environ if env is None else env
    raw = env.get(BRAKE_ENV, "").strip().lower()
    if raw in ("", "on", "1", "true", "yes"):
        return True
    if raw in ("off", "0", "false", "no"):
        return False
    raise SettingError(BRAKE_ENV, raw, "expected on or off", "off")


def level(limits: Limits, kernel_limit: int | None) -> int | None:
    """The ``memory.high`` for these limits, or None where there is no hard limit."""
    hard = limits.hard
    if hard is None:
        return None
    if kernel_limit is not None:
        hard = min(hard, kernel_limit)
    high = int(hard * HIGH_SHARE)
    if limits.soft is not None and limits.soft < hard:
        high = max(high, limits.soft)
    return high - high % 4096


@dataclass
class Brake:
    """A ``memory.high`` that ``run`` set, and how to undo what it took to set it."""

    path: str  # the command's cgroup
    high: int
    parent: str
    leaf: str | None = None  # where run moved itself (None: it did not move)
    enabled_memory: bool = False

    def release(self) -> None:
        """Undo: the memory controller for the parent's children, run's move, its leaf. The
        command's cgroup is removed by its owner; where it is left, so is its limit."""
        if self.enabled_memory:
            with contextlib.suppress(OSError):
                _write(self.parent, "cgroup.subtree_control", "-memory")
        if self.leaf is not None:
            with contextlib.suppress(OSError):
                _write(self.parent, "cgroup.procs", str(os.getpid()))
                os.rmdir(self.leaf)


def engage(
    command_cgroup: str | None,
    limits: Limits,
    quota: Quota,
    cgroup: Cgroup | None,
    journal: Journal | None = None,
    env: Mapping[str, str] | None = None,
) -> Brake | None:
    """Set the brake on ``command_cgroup`` where it can be set; None where it is not."""
    if command_cgroup is None or cgroup is None or cgroup.version != 2:
        return None
    if not quota.source.startswith("cgroup") or not enabled(env):
        return None
    high = level(limits, quota.limit)
    if high is None:
        return None
    parent = os.path.dirname(command_cgroup)
    brake = Brake(command_cgroup, high, parent)
    try:
        if not os.path.exists(os.path.join(command_cgroup, "memory.high")):
            _make_room(brake)
        _write(command_cgroup, "memory.high", str(high))
    except OSError as exc:
        log.info("memwarden run: no memory.high brake for the command: %s", exc)
        brake.release()
        return None
    log.info(
        "memwarden run: memory.high %s on the command's cgroup: past it the kernel slows "
        "the command down instead of OOM-killing it",
        format_size(high),
    )
    if journal is not None:
        journal.write("brake", cgroup=command_cgroup, high=high, supervisor=os.getpid())
    return brake


def _make_room(brake: Brake) -> None:
    """Move ``run`` into a leaf of its own and enable ``memory`` for the parent's children
    (OSError where ``run`` is not alone in its cgroup or may not)."""
    parent, me = brake.parent, os.getpid()
    _clean_left_behind(parent)
    others = [p for p in _read(parent, "cgroup.procs").split() if int(p) != me]
    if others:
        raise OSError(f"{len(others)} other process(es) share run's cgroup {parent}")
    leaf = os.path.join(parent, f"{SUPERVISOR_PREFIX}{me}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(leaf, 0o755)
    brake.leaf = leaf
    _write(leaf, "cgroup.procs", str(me))
    if "memory" not in _read(parent, "cgroup.subtree_control").split():
        _write(parent, "cgroup.subtree_control", "+memory")
        brake.enabled_memory = True


def _clean_left_behind(parent: str) -> None:
    """Remove the empty leaves of ``run``s that were killed before they could."""
    with contextlib.suppress(OSError):
        for name in os.listdir(parent):
            if name.startswith(SUPERVISOR_PREFIX):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(parent, name))  # busy: its run is alive


def _read(path: str, name: str) -> str:
    with open(os.path.join(path, name)) as f:
        return f.read()


def _write(path: str, name: str, value: str) -> None:
    with open(os.path.join(path, name), "w") as f:
        f.write(value)
