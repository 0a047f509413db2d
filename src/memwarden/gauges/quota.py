"""Where the memory quota comes from: setting, cgroup, Heroku dyno, or nowhere.

Order: ``MEMWARDEN_QUOTA`` → the process's cgroup limit → on Heroku (``DYNO`` set) the dyno
size table (``MEMWARDEN_DYNO_SIZE``) → none. Machine RAM is reported but is not a quota: a
worker alone on a box has no one to punish it but the kernel's global OOM killer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import psutil

from memwarden.gauges.cgroup import Cgroup
from memwarden.units import SettingError, parse_size

MB = 1024 * 1024

#: Dyno memory quotas (Heroku "Dyno Types") and the R15 factor: how far over its quota a
#: dyno may go (swapping, logging R14) before the platform kills it. Private and Shield
#: dynos do not swap, so they are killed at the quota itself. Source: Heroku Dev Center, "Dyno
#: Memory Behavior" (Cedar generation; Fir-generation dynos restart at 100%).
HEROKU_DYNO_SIZES: dict[str, tuple[int, float]] = {
    "eco": (512 * MB, 2.0),
    "basic": (512 * MB, 2.0),
    "standard-1x": (512 * MB, 2.0),
    "standard-2x": (1024 * MB, 2.0),
    "performance-m": (2560 * MB, 2.0),
    "performance-l": (14336 * MB, 2.0),
    "performance-l-ram": (30720 * MB, 1.2),
    "performance-xl": (63488 * MB, 1.2),
    "performance-2xl": (129024 * MB, 1.2),
    "private-s": (1024 * MB, 1.0),
    "private-m": (2560 * MB, 1.0),
    "private-l": (14336 * MB, 1.0),
    "private-l-ram": (30720 * MB, 1.0),
    "private-xl": (63488 * MB, 1.0),
    "private-2xl": (129024 * MB, 1.0),
    "shield-s": (1024 * MB, 1.0),
    "shield-m": (2560 * MB, 1.0),
    "shield-l": (14336 * MB, 1.0),
    "shield-l-ram": (30720 * MB, 1.0),
    "shield-xl": (63488 * MB, 1.0),
    "shield-2xl": (129024 * MB, 1.0),
}


@dataclass(frozen=True)
class Quota:
    """The memory the platform allows, where that figure came from, and the platform."""

    limit: int | None
    source: str
    platform: str  # "heroku" | "kubernetes" | "cgroup" | "bare"

    @property
    def kernel_enforced(self) -> bool:
        """True where reaching the quota is an OOM kill (cgroup), not a warning (Heroku R14)."""
        return self.platform != "heroku"


def detect_platform(env: Mapping[str, str]) -> str:
    if env.get("DYNO"):
        return "heroku"
    if env.get("KUBERNETES_SERVICE_HOST"):
        return "kubernetes"
    return "bare"


def detect_quota(
    env: Mapping[str, str],
    cgroup: Cgroup | None = None,
    quota: str | int | None = None,
    dyno_size: str | None = None,
) -> Quota:
    """The quota by the documented order; ``quota``/``dyno_size`` override their env vars.

    A bad ``MEMWARDEN_QUOTA`` or ``MEMWARDEN_DYNO_SIZE`` raises SettingError.
    """
    platform = detect_platform(env)
    raw = quota if quota is not None else env.get("MEMWARDEN_QUOTA", "").strip()
    if raw not in (None, ""):
        return Quota(parse_size(raw, "MEMWARDEN_QUOTA"), "MEMWARDEN_QUOTA", platform)
    if cgroup is not None:
        try:
            limit = cgroup.limit()
        except (OSError, ValueError):
            limit = None
        if limit is not None and limit < psutil.virtual_memory().total:
            where = f"cgroup v{cgroup.version} {cgroup.path}"
            return Quota(limit, where, platform if platform != "bare" else "cgroup")
    if platform == "heroku":
        size = (dyno_size or env.get("MEMWARDEN_DYNO_SIZE", "")).strip().lower()
        if size:
            if size not in HEROKU_DYNO_SIZES:
                raise SettingError("MEMWARDEN_DYNO_SIZE", size, "unknown dyno size", "standard-2x")
            return Quota(HEROKU_DYNO_SIZES[size][0], f"heroku dyno size {size}", platform)
    return Quota(None, "none", platform)
