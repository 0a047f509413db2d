"""Issue 15, item 14: settings accepted that broke later now fail at start, through the real
commands, with the setting's name and an example — never a raw traceback, never the wrong
setting blamed, never a mistyped option run as the command. (Every setting × bad values:
tests/test_settings_table.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from faultkit import clean_env, run_victim

from memwarden.units import SettingError
from memwarden.warden import Warden

MEMWARDEN = [sys.executable, "-c", "from memwarden.cli import main; main()"]


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MEMWARDEN, *args], capture_output=True, text=True, env=clean_env(**env), timeout=120
    )


def test_run_with_a_percent_journal_size_fails_at_start_without_a_traceback(tmp_path: Path):
    out = cli(
        "run", "--journal", str(tmp_path / "j.jsonl"), "--", "true",
        MEMWARDEN_JOURNAL_MAX_BYTES="50%", MEMWARDEN_QUOTA="1GB",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "MEMWARDEN_JOURNAL_MAX_BYTES" in out.stderr and "for example" in out.stderr


def test_a_mistyped_run_option_is_not_run_as_the_command(tmp_path: Path):
    marker = tmp_path / "ran"
    out = cli(
        "run", "--sof-limit", "990MB", "--", "sh", "-c", f"touch {marker}",
        MEMWARDEN_QUOTA="1GB",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "--sof-limit" in out.stderr and "--soft-limit" in out.stderr
    assert "cannot start" not in out.stderr
    assert not marker.exists()


def test_a_soft_limit_above_the_default_hard_limit_blames_the_soft_limit():
    out = cli("check", MEMWARDEN_SOFT_LIMIT="990MB", MEMWARDEN_QUOTA="1GB")
    assert out.returncode == 2, out.stderr
    assert "MEMWARDEN_SOFT_LIMIT='990MB'" in out.stderr, out.stderr
    assert "MEMWARDEN_HARD_LIMIT=" not in out.stderr.split("for example")[0], out.stderr
    assert "Traceback" not in out.stderr


def test_a_huge_interval_stops_the_worker_at_start_not_its_watchdog_later(tmp_path: Path):
    victim = run_victim(tmp_path / "j.jsonl", MEMWARDEN_INTERVAL="9999999999")
    assert victim.status != 0
    assert "SettingError" in victim.stderr and "MEMWARDEN_INTERVAL" in victim.stderr
    assert "OverflowError" not in victim.stderr


def test_a_port_out_of_range_fails_when_the_warden_is_made_not_at_start(tmp_path: Path):
    with pytest.raises(SettingError, match="MEMWARDEN_METRICS_PORT"):
        Warden(env={"MEMWARDEN_METRICS_PORT": "99999"}, state_dir=str(tmp_path), quota="1GB")
