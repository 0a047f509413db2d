"""Settings from env vars and keywords; bad input names the setting and an example."""

import json
import os
import subprocess
import sys

import pytest

from memwarden.config import Config, settings_markdown, settings_table
from memwarden.gauges.quota import Quota
from memwarden.setup import resolve_limits
from memwarden.units import SettingError

MB = 1024 * 1024


def test_defaults():
    c = Config.from_env({})
    assert c.grace == 120 and c.shutdown_timeout == 25 and c.interval == 0.1
    assert c.alert_interval == 0.02
    assert c.reclaim and c.restart == "signal" and not c.dry_run and c.measure == "auto"


def test_env_and_keywords_keywords_win():
    env = {
        "MEMWARDEN_GRACE": "2m",
        "MEMWARDEN_SOFT_LIMIT": "400MB",
        "MEMWARDEN_RECLAIM": "off",
        "MEMWARDEN_RESTART": "exit",
        "MEMWARDEN_MAX_RESTARTS": "5",
    }
    c = Config.from_env(env, soft_limit="300MB")
    assert c.grace == 120 and c.soft_limit == "300MB" and c.reclaim is False
    assert c.restart == "exit" and c.max_restarts == 5


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"MEMWARDEN_GRACE": "soon"}, "MEMWARDEN_GRACE"),
        ({"MEMWARDEN_SOFT_LIMIT": "big"}, "MEMWARDEN_SOFT_LIMIT"),
        ({"MEMWARDEN_RESTART": "reboot"}, "MEMWARDEN_RESTART"),
        ({"MEMWARDEN_MEASURE": "vibes"}, "MEMWARDEN_MEASURE"),
        ({"MEMWARDEN_DRY_RUN": "perhaps"}, "MEMWARDEN_DRY_RUN"),
        ({"MEMWARDEN_MAX_RESTARTS": "three"}, "MEMWARDEN_MAX_RESTARTS"),
        ({"MEMWARDEN_STOP_SIGNAL": "SIGNOPE"}, "MEMWARDEN_STOP_SIGNAL"),
    ],
)
def test_bad_env_names_the_setting_with_an_example(env, name):
    with pytest.raises(SettingError) as err:
        Config.from_env(env)
    assert err.value.setting == name and "for example" in str(err.value)


def test_unknown_keyword_is_an_error():
    with pytest.raises(SettingError, match="unknown setting"):
        Config.from_env({}, soft_limt="1GB")


def test_limits_default_by_platform():
    c = Config.from_env({})
    cg = resolve_limits(c, Quota(1000 * MB, "cgroup v1 x", "cgroup"))
    assert (cg.soft, cg.hard) == (850 * MB, 950 * MB)
    heroku = resolve_limits(c, Quota(1000 * MB, "cgroup v1 x", "heroku"))
    assert (heroku.soft, heroku.hard) == (900 * MB, 1000 * MB)
    off = resolve_limits(c, Quota(None, "none", "bare"))
    assert not off.enabled


def test_percent_limits_and_order_check():
    q = Quota(1000 * MB, "MEMWARDEN_QUOTA", "bare")
    lim = resolve_limits(Config.from_env({}, soft_limit="50%", hard_limit="70%"), q)
    assert (lim.soft, lim.hard) == (500 * MB, 700 * MB)
    with pytest.raises(SettingError, match="MEMWARDEN_HARD_LIMIT"):
        resolve_limits(Config.from_env({}, soft_limit="80%", hard_limit="60%"), q)


def test_explicit_soft_limit_keeps_quota_hard_default():
    q = Quota(1000 * MB, "cgroup", "cgroup")
    lim = resolve_limits(Config.from_env({}, soft_limit="500MiB"), q)
    assert lim.soft == 500 * MB and lim.hard == 950 * MB


def test_settings_table_covers_every_field():
    rows = settings_table()
    names = [r[0] for r in rows]
    assert "MEMWARDEN_SOFT_LIMIT" in names and "MEMWARDEN_SHUTDOWN_TIMEOUT" in names
    assert all(r[3] for r in rows)  # every setting has help text
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.md")) as f:
        page = f.read()
    block = page.split("<!-- settings:start -->\n")[1].split("\n<!-- settings:end -->")[0]
    assert block == settings_markdown(), (
        "docs/configuration.md's settings table is stale: regenerate it with `make readme`"
    )


def run_check(*args, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "memwarden.cli", "check", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=60,
    )


def test_check_json_has_the_keys_in_bytes():
    out = run_check("--json", MEMWARDEN_QUOTA="2GB")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in (
        "platform",
        "quota",
        "quota_source",
        "gauge",
        "reading",
        "allocator",
        "soft_limit",
        "hard_limit",
        "restart",
    ):
        assert key in report
    assert report["quota"] == 2_000_000_000 and report["quota_source"] == "MEMWARDEN_QUOTA"
    assert report["soft_limit"] == int(2_000_000_000 * 0.85)
    assert report["reading"] > 1_000_000


def test_check_bad_setting_exits_non_zero_with_the_error():
    out = run_check(MEMWARDEN_HARD_LIMIT="12 parsecs")
    assert out.returncode != 0
    assert "MEMWARDEN_HARD_LIMIT" in out.stderr and "for example" in out.stderr


def test_the_pressure_trigger_is_off_by_default_and_reaches_the_limits_as_a_fraction():
    q = Quota(1000 * MB, "cgroup", "cgroup")
    off = resolve_limits(Config.from_env({}), q)
    assert off.pressure_full is None and off.pressure_hold == 30
    env = {"MEMWARDEN_PRESSURE_FULL": "40%", "MEMWARDEN_PRESSURE_HOLD": "1m"}
    on = resolve_limits(Config.from_env(env), q)
    assert on.pressure_full == pytest.approx(0.40) and on.pressure_hold == 60
    assert Config.from_env({"MEMWARDEN_PRESSURE_FULL": "12.5"}).pressure_full == 12.5
    assert Config.from_env({}, pressure_full=40).replace().pressure_full == 40  # idempotent


@pytest.mark.parametrize("bad", ["0", "0%", "-5%", "101%", "40MB", "lots", "nan"])
def test_a_bad_pressure_threshold_names_the_setting(bad):
    with pytest.raises(SettingError) as caught:
        Config.from_env({"MEMWARDEN_PRESSURE_FULL": bad})
    assert caught.value.setting == "MEMWARDEN_PRESSURE_FULL"
    assert "for example MEMWARDEN_PRESSURE_FULL=40%" in str(caught.value)


@pytest.mark.parametrize("bad", ["0", "-1s", "40%", "2d"])
def test_a_bad_pressure_hold_names_the_setting(bad):
    with pytest.raises(SettingError) as caught:
        Config.from_env({"MEMWARDEN_PRESSURE_HOLD": bad})
    assert caught.value.setting == "MEMWARDEN_PRESSURE_HOLD"
    assert "for example MEMWARDEN_PRESSURE_HOLD=" in str(caught.value)


def test_every_memwarden_variable_the_code_reads_is_known():
    """A variable read outside Config (run's brake switch, the job protocol's paths that
    run hands its command) is no typo: warn_unknown must not call it one."""
    import pathlib
    import re

    from memwarden.config import known_env

    src = pathlib.Path(__file__).resolve().parent.parent / "src" / "memwarden"
    read = {
        m for p in src.rglob("*.py") for m in re.findall(r'"(MEMWARDEN_[A-Z_]+)"', p.read_text())
    }
    assert read - set(known_env()) == set()
