"""Settings → memory cgroup, quota, gauge and limits: the one place every guard sets up from.

The in-process :class:`~memwarden.warden.Warden`, ``memwarden run``, ``memwarden check`` and a
Huey worker child all start here, so they agree on what they measure and where they act."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from memwarden.config import Config, limits_error
from memwarden.gauges import Gauge, choose_gauge
from memwarden.gauges.cgroup import Cgroup
from memwarden.gauges.quota import Quota, detect_quota
from memwarden.policy import Limits


@dataclass(frozen=True)
class Setup:
    """Where we run (the memory cgroup, if any), the quota and the limits in bytes."""

    cgroup: Cgroup | None
    quota: Quota
    limits: Limits

    def gauge(self, config: Config, root: int | None = None) -> Gauge:
        """The gauge ``MEMWARDEN_MEASURE`` asks for (``root``: the process tree to sum)."""
        return choose_gauge(config.measure, self.quota, self.cgroup, root=root)


def set_up(
    config: Config,
    env: Mapping[str, str] | None = None,
    *,
    quota: Quota | None = None,
    can_recycle: bool = False,
    pool_reclaim: bool = False,
) -> Setup:
    """Find the cgroup and the quota (``quota``: one already known), then the limits.
    Raises :class:`~memwarden.units.SettingError` naming the setting that is wrong."""
    env = os.environ if env is None else env
    cgroup = Cgroup.of_self()
    quota = quota or detect_quota(env, cgroup, config.quota, config.dyno_size)
    limits = resolve_limits(config, quota, can_recycle=can_recycle, pool_reclaim=pool_reclaim)
    return Setup(cgroup, quota, limits)


def resolve_limits(
    config: Config, quota: Quota, can_recycle: bool = False, pool_reclaim: bool = False
) -> Limits:
    """Bytes for the soft/hard limits: explicit settings, else defaults by platform."""
    q = quota.limit
    soft, hard = config.size("soft_limit", q), config.size("hard_limit", q)
    if q is not None:
        soft_share, hard_share = (0.85, 0.95) if quota.kernel_enforced else (0.90, 1.00)
        if soft is None and config.hard_limit is None:
            soft = int(q * soft_share)
        if hard is None:
            hard = int(q * hard_share)
    if soft is not None and hard is not None and hard < soft:
        raise limits_error(config, soft, hard, q)
    first = soft if soft is not None else hard
    return Limits(
        soft=soft,
        hard=hard,
        grace=config.grace,
        min_uptime=config.min_uptime,
        max_restarts=config.max_restarts,
        restart_window=config.restart_window,
        reclaim=config.reclaim,
        # Regrowth re-arms a reclaim where the next remedy is a restart, or where the reclaim
        # reaches the pool children (a trim there is cheaper than any recycle); where only
        # our own heap would be trimmed but a child can be recycled, the recycle comes first.
        reclaim_regrow=(
            None if first is None or (can_recycle and not pool_reclaim) else first // 10
        ),
        can_recycle=can_recycle,
        drain_time=config.shutdown_timeout,
        pressure_full=None if config.pressure_full is None else float(config.pressure_full) / 100,
        pressure_hold=config.pressure_hold,
    )
