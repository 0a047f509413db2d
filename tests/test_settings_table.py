"""Every ``MEMWARDEN_*`` setting × bad values: each works as documented or fails at start
with the setting's name and an example — never later, never with a raw traceback.

"At start" is where a user meets it: an in-process warden being made (then its watchdog
runs a few readings), ``memwarden check`` (click, in process) and ``memwarden run``'s
settings and supervisor (made, not run). The table is made from :class:`Config` itself, so
a setting added later is covered without a line here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from memwarden.cli import main as cli
from memwarden.config import Config, env_name
from memwarden.restart import NoRestart
from memwarden.supervisor.run import Supervisor, settings
from memwarden.units import SettingError
from memwarden.warden import Hooks, Warden

#: One wrong unit per kind of setting.
WRONG_UNIT = {
    "size": "5parsecs",
    "duration": "5GB",
    "percent": "5MB",
    "int": "5s",
    "bool": "5%",
    "choice": "5MB",
    "signal": "15s",
    "url": "5MB",
    "path": "5MB",
    "text": "5MB",
}
BAD = {
    "garbage": lambda kind: "?!bogus value",
    "negative": lambda kind: "-5",
    "zero": lambda kind: "0",
    "huge": lambda kind: "9" * 30,
    "empty": lambda kind: "",
    "wrong unit": lambda kind: WRONG_UNIT[kind],
}
FIELDS = {env_name(f): f for f in dataclasses.fields(Config)}
SETTINGS = [(name, f.metadata["kind"]) for name, f in FIELDS.items()]
CASES = [
    pytest.param(name, kind, label, make(kind), id=f"{name[10:]}-{label}")
    for name, kind in SETTINGS
    for label, make in BAD.items()
]
#: Which bad values each kind refuses (the rest work as documented: an empty variable is an
#: unset one, ``0`` is false, a path or a job kind may be any text).
REFUSED = {
    "size": {"garbage", "negative", "zero", "huge", "wrong unit"},
    "duration": {"garbage", "negative", "zero", "huge", "wrong unit"},
    "percent": {"garbage", "negative", "zero", "huge", "wrong unit"},
    "int": {"garbage", "negative", "zero", "huge", "wrong unit"},
    "bool": {"garbage", "negative", "huge", "wrong unit"},
    "choice": {"garbage", "negative", "zero", "huge", "wrong unit"},
    "signal": {"garbage", "negative", "zero", "huge", "wrong unit"},
    "url": {"garbage", "negative", "zero", "huge", "wrong unit"},
    "path": set(),
    "text": set(),
}
#: Where the documented meaning makes a bad-looking value fine, or a free text one wrong.
WORKS = {
    ("MEMWARDEN_GRACE", "zero"),  # no grace: restart at once
    ("MEMWARDEN_MIN_UPTIME", "zero"),  # no minimum uptime
    ("MEMWARDEN_KUBERNETES_GRACE", "zero"),  # gracePeriodSeconds=0
    ("MEMWARDEN_MAX_RESTARTS", "zero"),  # no soft restart at all
    ("MEMWARDEN_API_RETRIES", "zero"),  # one try
}
REFUSED_TEXT = {
    ("MEMWARDEN_DYNO_SIZE", label)
    for label in ("garbage", "negative", "zero", "huge", "wrong unit")
} | {
    ("MEMWARDEN_FLEET", "garbage"),
    ("MEMWARDEN_METRICS_ADDR", "garbage"),
    ("MEMWARDEN_METRICS_ADDR", "negative"),
}


def expected(name: str, kind: str, label: str) -> str:
    if label == "empty" or (name, label) in WORKS:
        return "works"
    if label in REFUSED[kind] or (name, label) in REFUSED_TEXT:
        return "refused"
    return "works"


#: What issue 15 saw accepted and break later: each must now fail at start.
MUST_FAIL = {
    ("MEMWARDEN_JOURNAL_MAX_BYTES", "50%"),
    ("MEMWARDEN_INTERVAL", "9999999999"),
    ("MEMWARDEN_STOP_SIGNAL", "SIG_DFL"),
    ("MEMWARDEN_METRICS_PORT", "99999"),
    ("MEMWARDEN_HARD_LIMIT", "0"),
    ("MEMWARDEN_EXIT_CODE", "256"),
    ("MEMWARDEN_API_TIMEOUT", "0"),
}


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A quiet starting point: a quota well above us, state and cwd in the test's dir."""
    monkeypatch.chdir(tmp_path)
    for key in [k for k in __import__("os").environ if k.startswith("MEMWARDEN_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("DYNO", raising=False)
    return {"MEMWARDEN_QUOTA": "64GB", "MEMWARDEN_STATE_DIR": str(tmp_path / "state")}


def assert_named(err: BaseException | str, name: str) -> None:
    text = str(err)
    assert name in text, text
    assert "for example" in text, text
    assert "Traceback" not in text, text


def start_in_process(env: dict[str, str], caplog: pytest.LogCaptureFixture) -> Config | None:
    """A warden made from ``env`` (None if that raised SettingError) whose watchdog then
    takes a few readings; fails on any traceback it logs or a watchdog that dies."""
    kills: list[int] = []
    caplog.clear()
    try:
        warden = Warden(env=env, restarter=NoRestart(), hooks=Hooks(kill=lambda: kills.append(1)))
    except SettingError:
        raise
    try:
        warden.start()
        deadline = time.monotonic() + 30
        seen = 0
        last = None
        while seen < 3 and time.monotonic() < deadline:
            if warden.last_sample is not last:
                last, seen = warden.last_sample, seen + 1
            time.sleep(0.01)
        assert warden._thread is not None and warden._thread.is_alive(), "the watchdog died"
        assert seen >= 3 or not warden.enabled, "the watchdog took no readings"
    finally:
        warden.close()
    tracebacks = [r for r in caplog.records if r.exc_info and r.name.startswith("memwarden")]
    assert not tracebacks, tracebacks[0].getMessage()
    return warden.config


@pytest.mark.parametrize(("name", "kind", "label", "value"), CASES)
def test_every_setting_with_a_bad_value_works_or_fails_at_start(
    base: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    name: str,
    kind: str,
    label: str,
    value: str,
) -> None:
    env = {**base, name: value}
    caplog.set_level(logging.INFO)
    outcomes: dict[str, Any] = {}

    # 1. In process: the warden an integration makes, and its watchdog.
    if name in FIELDS:
        try:
            config = start_in_process(env, caplog)
        except SettingError as exc:
            assert_named(exc, name)
            outcomes["warden"] = "refused"
        else:
            outcomes["warden"] = "works"
            assert config is not None
            f = FIELDS[name]
            if value == "":  # documented: an empty variable is an unset one
                assert getattr(config, f.name) == Config().__getattribute__(f.name)

    # 2. memwarden check, as a user runs it.
    result = CliRunner().invoke(cli, ["check", "--json"], env=env, catch_exceptions=True)
    if result.exit_code == 0:
        outcomes["check"] = "works"
    else:
        assert result.exit_code == 2, (result.output, result.exception)
        assert isinstance(result.exception, SystemExit), result.exception
        assert_named(result.output, name)
        outcomes["check"] = "refused"

    # 3. memwarden run: its settings, and its supervisor made from them.
    try:
        resolved = settings(env=env)
        Supervisor(["true"], resolved, status=False).journal.close()
        outcomes["run"] = "works"
    except SettingError as exc:
        assert_named(exc, name)
        outcomes["run"] = "refused"

    # One verdict for the value, wherever it is met.
    verdicts = set(outcomes.values())
    assert len(verdicts) == 1, outcomes
    assert verdicts == {expected(name, kind, label)}, outcomes


@pytest.mark.parametrize(("name", "value"), sorted(MUST_FAIL))
def test_what_issue_15_saw_break_later_now_fails_at_start(
    base: dict[str, str], name: str, value: str
) -> None:
    with pytest.raises(SettingError) as caught:
        Config.from_env({**base, name: value})
    assert caught.value.setting == name
    assert_named(caught.value, name)


def test_an_unknown_variable_is_warned_about_with_the_closest_name(
    base: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="memwarden"):
        Config.from_env({**base, "MEMWARDEN_SOFT_LIMT": "512MB", "MEMWARDEN_GRACEE": "1m"})
    text = caplog.text
    assert "MEMWARDEN_SOFT_LIMT" in text and "did you mean MEMWARDEN_SOFT_LIMIT?" in text
    assert "MEMWARDEN_GRACEE" in text and "did you mean MEMWARDEN_GRACE?" in text


def test_an_unknown_keyword_names_the_setting_it_means() -> None:
    with pytest.raises(SettingError) as caught:
        Config.from_env({}, soft_limt="512MB")
    text = str(caught.value)
    assert "did you mean soft_limit?" in text
    assert "for example soft_limit='512MB'" in text
    assert "soft_limt=soft_limit" not in text
