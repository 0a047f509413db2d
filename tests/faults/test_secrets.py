"""Issue 15, item 2: no secret in anything memwarden shows — status, check, logs, reprs,
setting errors, ``run``'s journal and log, an API error's echo of our request."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fakeapi import FakeAPI, Fallback, Hook, Reply, Request
from memwarden.config import Config
from memwarden.fleet import Fleet
from memwarden.restart.api import Secret
from memwarden.restart.heroku import HerokuRestarter
from memwarden.units import SettingError

MEMWARDEN = [sys.executable, "-c", "from memwarden.cli import main; main()"]
CANARY = "CANARY-5ecret-9f1d"
#: A Redis that does not answer (nothing listens on port 1), with the password as a query.
QUERY_URL = f"redis://127.0.0.1:1/0?password={CANARY}"
USERINFO_URL = f"redis://default:{CANARY}@127.0.0.1:1/0"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    env.pop("DYNO", None)
    env.update(extra)
    return env


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MEMWARDEN, *args], capture_output=True, text=True, env=clean_env(**env), timeout=120
    )


@pytest.mark.parametrize("url", [QUERY_URL, USERINFO_URL])
def test_status_never_prints_the_redis_password(url: str) -> None:
    out = cli("status", "--redis", url)
    assert out.returncode != 0
    assert "cannot read Redis" in out.stderr
    assert CANARY not in out.stdout + out.stderr


@pytest.mark.parametrize("url", [QUERY_URL, USERINFO_URL])
def test_check_never_prints_the_redis_password(url: str) -> None:
    out = cli("check", "--json", MEMWARDEN_REDIS_URL=url, MEMWARDEN_QUOTA="2GB")
    assert out.returncode == 0, out.stderr
    warnings = json.loads(out.stdout)["warnings"]
    assert any("does not answer" in w for w in warnings), warnings
    assert CANARY not in out.stdout + out.stderr


def test_redis_unreachable_log_and_fleet_repr_hide_the_password(caplog) -> None:
    fleet = Fleet.from_config(Config(redis_url=QUERY_URL), {})
    assert fleet is not None
    with caplog.at_level(logging.DEBUG, logger="memwarden"):
        assert fleet.lock.try_acquire()  # Redis down: the local decision stands
    assert any("unreachable" in m for m in caplog.messages), caplog.messages
    assert CANARY not in caplog.text
    assert CANARY not in repr(fleet) and "password=***" in repr(fleet)


def test_a_setting_error_hides_the_password() -> None:
    with pytest.raises(SettingError) as caught:
        Config.from_env({"MEMWARDEN_REDIS_URL": f"redis://127.0.0.1:notaport/0?password={CANARY}"})
    assert "MEMWARDEN_REDIS_URL" in str(caught.value)
    assert CANARY not in str(caught.value)


#: (command line, the secret in it). Each form of passing a secret seen in worker commands.
ARGV_FORMS = [
    (["--token=S01"], "S01"),
    (["--token", "S02"], "S02"),
    (["--password=S03"], "S03"),
    (["--password", "S04"], "S04"),
    (["--api-key", "S05"], "S05"),
    (["--secret=S06"], "S06"),
    (["-t", "S07"], "S07"),
    (["-p", "S08"], "S08"),
    (["-pS09"], "S09"),
    (["-a", "S10"], "S10"),
    (["--auth=S11"], "S11"),
    (["--pass=S12"], "S12"),
    (["--passphrase", "S13"], "S13"),
    (["--private-key=S14"], "S14"),
    (["API_TOKEN=S15"], "S15"),
    (["sh", "-c", "celery worker --token=S16 -l info"], "S16"),
    (["-b", "redis://:S17@cache:6379/0"], "S17"),
    (["-b", "redis://cache:6379/0?password=S18"], "S18"),
    (["amqp://guest:S19@mq//"], "S19"),
    (["DATABASE_URL=postgres://u:S20@db/app"], "S20"),
    (["sh", "-c", "env AWS_SECRET_ACCESS_KEY=S21 python w.py"], "S21"),
    (["-H", "Authorization: Bearer S22-abcdefgh"], "S22"),
    (["--client-secret", "S23"], "S23"),
    (["--access-key=S24"], "S24"),
]


@pytest.mark.parametrize(("args", "secret"), ARGV_FORMS, ids=[s for _, s in ARGV_FORMS])
def test_one_rule_set_hides_every_command_line_form(args: list[str], secret: str) -> None:
    from memwarden import redact

    shown = redact.argv(["worker", *args])
    assert secret not in " ".join(shown), shown
    assert "***" in " ".join(shown)


def test_harmless_arguments_are_left_as_they_are() -> None:
    from memwarden import redact

    argv = ["celery", "-A", "proj", "worker", "-c", "4", "--author", "me", "--loglevel=info"]
    assert redact.argv(argv) == argv


@pytest.fixture(scope="module")
def run_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One ``memwarden run`` whose command line holds every form: its journal and log."""
    tmp = tmp_path_factory.mktemp("run")
    journal = tmp / "journal.jsonl"
    argv = ["sh", "-c", "exit 3", "worker"]
    for args, _ in ARGV_FORMS:
        argv += args
    out = subprocess.run(
        [*MEMWARDEN, "run", "--journal", str(journal), "--max-early-exits", "1", "--", *argv],
        capture_output=True,
        text=True,
        env=clean_env(MEMWARDEN_QUOTA="2GB"),
        timeout=120,
    )
    assert out.returncode == 3, out.stderr
    starts = [json.loads(line) for line in journal.read_text().splitlines()]
    assert any(r["event"] == "start" for r in starts)
    return journal.read_text() + out.stdout + out.stderr


@pytest.mark.parametrize(("args", "secret"), ARGV_FORMS, ids=[s for _, s in ARGV_FORMS])
def test_run_shows_no_secret_of_its_command(run_output: str, args: list[str], secret: str) -> None:
    assert secret not in run_output


def test_an_api_error_does_not_echo_our_token_into_the_log(caplog, tmp_path: Path) -> None:
    token = "hrku-" + CANARY

    def echo(request: Request) -> None:
        reply.body = {"error": "teapot", "you_sent": request.headers.get("authorization")}

    reply = Reply(418)
    with FakeAPI() as api:
        api.script(Hook(echo, reply))
        fallback = Fallback()
        restarter = HerokuRestarter(
            app="app",
            dyno="worker.1",
            token=Secret(token),
            api_url=api.url,
            timeout=5.0,
            retries=0,
            fallback=fallback,
        )
        with caplog.at_level(logging.DEBUG, logger="memwarden"):
            restarter.restart("over")
    assert fallback.calls, "an unexpected status falls back to the local way"
    assert "HTTP 418" in caplog.text
    assert CANARY not in caplog.text
