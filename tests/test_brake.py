"""The ``memory.high`` brake's level and setting (its effect is measured in the cgroup v2 VM:
tests/test_cgroup2_vm.py, bench/brake_v2.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from memwarden.gauges.cgroup import Cgroup
from memwarden.gauges.quota import Quota
from memwarden.policy import Limits
from memwarden.supervisor import brake
from memwarden.units import SettingError

MB = 1024 * 1024


def limits(soft: int | None, hard: int | None) -> Limits:
    return Limits(soft=soft, hard=hard, grace=1.0, min_uptime=0.0, max_restarts=3)


def test_the_brake_sits_a_little_under_the_hard_limit_and_never_under_the_soft() -> None:
    assert brake.level(limits(int(0.85 * 256 * MB), int(0.95 * 256 * MB)), 256 * MB) == (
        int(int(0.95 * 256 * MB) * 0.98) // 4096 * 4096
    )
    # A hard limit set over the kernel's: the kernel's limit is the one to stay under.
    assert brake.level(limits(100 * MB, 400 * MB), 200 * MB) == int(200 * MB * 0.98)
    # Soft and hard limits close together: never below the soft limit.
    assert brake.level(limits(99 * MB, 100 * MB), None) == 99 * MB
    assert brake.level(limits(100 * MB, None), 200 * MB) is None


def test_the_setting_is_on_or_off_and_anything_else_names_it() -> None:
    assert brake.enabled({}) and brake.enabled({"MEMWARDEN_BRAKE": "on"})
    assert not brake.enabled({"MEMWARDEN_BRAKE": "off"})
    with pytest.raises(SettingError) as err:
        brake.enabled({"MEMWARDEN_BRAKE": "sometimes"})
    assert "MEMWARDEN_BRAKE" in str(err.value) and "off" in str(err.value)


def test_run_refuses_a_bad_brake_setting_at_start() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "memwarden.cli", "run", "--", "true"],
        env={"MEMWARDEN_BRAKE": "maybe", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "MEMWARDEN_BRAKE" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_no_brake_without_a_v2_cgroup_quota(tmp_path) -> None:
    quota = Quota(256 * MB, "cgroup v1 /x", "cgroup")
    assert brake.engage(str(tmp_path), limits(1, 2), quota, Cgroup(str(tmp_path), 1)) is None
    v2 = Cgroup(str(tmp_path), 2)
    assert brake.engage(str(tmp_path), limits(1, 2), Quota(None, "none", "bare"), v2) is None
    off = {"MEMWARDEN_BRAKE": "off"}
    v2_quota = Quota(256 * MB, "cgroup v2 /x", "cgroup")
    assert brake.engage(str(tmp_path), limits(1, 2), v2_quota, v2, env=off) is None
