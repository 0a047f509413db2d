"""Heroku restarts against a real local HTTP server playing the Platform API."""

from __future__ import annotations

import logging
import os
import signal
import traceback

import pytest

from fakeapi import FakeAPI, Fallback, Hook, Reply, Request, Stall
from memwarden.cli.check import inspect
from memwarden.config import Config
from memwarden.gauges.quota import HEROKU_DYNO_SIZES
from memwarden.restart.api import ApiError, Secret, call
from memwarden.restart.heroku import ACCEPT, HerokuRestarter, checks
from platform_worker import run_worker

TOKEN = "hrku-CANARY-7f3a9c1e-do-not-leak"


def restarter(api: FakeAPI, **kw: object) -> tuple[HerokuRestarter, Fallback]:
    fallback = Fallback()
    options: dict[str, object] = {
        "app": "memwarden-test",
        "dyno": "worker.1",
        "token": Secret(TOKEN),
        "api_url": api.url,
        "timeout": 2.0,
        "retries": 3,
    }
    options.update(kw)
    return HerokuRestarter(fallback=fallback, **options), fallback  # type: ignore[arg-type]


@pytest.fixture
def api():
    with FakeAPI() as server:
        yield server


def test_restart_is_a_delete_of_this_dyno(api):
    api.script(Reply(202, {}))
    r, fallback = restarter(api)
    r.restart("1 GiB over soft limit")
    assert len(api.requests) == 1
    req = api.requests[0]
    assert req.method == "DELETE"
    assert req.path == "/apps/memwarden-test/dynos/worker.1"
    assert req.headers["accept"] == ACCEPT == "application/vnd.heroku+json; version=3"
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert req.body == b""
    assert fallback.calls == []


def test_server_errors_are_retried_until_success(api, caplog):
    api.script(500, 503, Reply(202))
    r, fallback = restarter(api)
    with caplog.at_level(logging.WARNING, logger="memwarden"):
        r.restart("over")
    assert [q.method for q in api.requests] == ["DELETE"] * 3
    assert fallback.calls == []
    retries = [m for m in caplog.messages if "try " in m]
    assert len(retries) == 2 and "HTTP 500" in retries[0] and "HTTP 503" in retries[1]
    assert any("after 3 tries" in m for m in caplog.messages)


def test_rate_limit_waits_for_retry_after(api):
    api.script(Reply(429, headers={"Retry-After": "0.3"}), Reply(202))
    r, fallback = restarter(api)
    r.restart("over")
    assert len(api.requests) == 2
    assert api.requests[1].t - api.requests[0].t >= 0.25
    assert fallback.calls == []


def test_a_timeout_is_retried(api):
    api.script(Stall(10.0), Reply(202))
    r, fallback = restarter(api, timeout=1.0)
    r.restart("over")
    assert len(api.requests) == 2
    assert fallback.calls == []


def test_gives_up_after_the_retries_and_restarts_locally(api, caplog):
    api.script(500)
    r, fallback = restarter(api, retries=2)
    with caplog.at_level(logging.ERROR, logger="memwarden"):
        r.restart("over")
    assert len(api.requests) == 3
    assert fallback.calls == ["heroku API unavailable"]
    assert any("gave up after 3 tries (last: HTTP 500)" in m for m in caplog.messages)


@pytest.mark.parametrize(
    ("status", "names"),
    [(401, "HEROKU_API_TOKEN"), (403, "HEROKU_API_TOKEN"), (404, "HEROKU_APP_NAME")],
)
def test_refusals_are_not_retried_and_name_the_variable(api, caplog, status, names):
    api.script(Reply(status, {"id": "unauthorized", "message": "Invalid credentials."}))
    r, fallback = restarter(api)
    with caplog.at_level(logging.ERROR, logger="memwarden"):
        r.restart("over")
    assert len(api.requests) == 1
    assert fallback.calls == ["heroku API unavailable"]
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert any(f"HTTP {status}" in m and names in m for m in errors), errors
    assert any("restarting the local way instead" in m for m in errors)


def test_missing_settings_restart_locally_without_calling(api, caplog):
    r, fallback = restarter(api, app=None, token=Secret(""))
    with caplog.at_level(logging.ERROR, logger="memwarden"):
        r.restart("over")
    assert api.requests == []
    assert fallback.calls == ["heroku API unavailable"]
    text = "\n".join(caplog.messages)
    assert "HEROKU_APP_NAME" in text and "runtime-dyno-metadata" in text
    assert "HEROKU_API_TOKEN" in text


def test_check_says_what_to_enable():
    bare = checks(Config(restart="heroku"), {"DYNO": "worker.1"})
    assert any("HEROKU_APP_NAME" in w and "labs:enable runtime-dyno-metadata" in w for w in bare)
    assert any("HEROKU_API_TOKEN" in w for w in bare)
    assert not any(w.startswith("DYNO") for w in bare)
    off_heroku = checks(Config(restart="heroku"), {"HEROKU_APP_NAME": "a", "HEROKU_API_TOKEN": "t"})
    assert len(off_heroku) == 1 and off_heroku[0].startswith("DYNO is not set")
    ready = {"DYNO": "worker.1", "HEROKU_APP_NAME": "a", "HEROKU_API_TOKEN": TOKEN}
    assert checks(Config(restart="heroku"), ready) == []
    crash = checks(Config(restart="signal"), {"DYNO": "worker.1"})
    assert len(crash) == 1 and "MEMWARDEN_RESTART=heroku" in crash[0]
    assert checks(Config(restart="signal"), {}) == []


def test_memwarden_check_reports_the_heroku_problems():
    env = {"DYNO": "worker.1", "MEMWARDEN_RESTART": "heroku", "MEMWARDEN_QUOTA": "512MB"}
    report = inspect(env=env)
    assert report["platform"] == "heroku"
    assert any("runtime-dyno-metadata" in w for w in report["warnings"])
    assert any("HEROKU_API_TOKEN" in w for w in report["warnings"])


def test_r15_factors_follow_the_dev_center():
    # "Dyno Memory Behavior": 2x up to Performance-L, 1.2x above, the quota on Private/Shield.
    assert HEROKU_DYNO_SIZES["standard-1x"] == (512 * 2**20, 2.0)
    assert HEROKU_DYNO_SIZES["performance-l"] == (14336 * 2**20, 2.0)
    for big in ("performance-l-ram", "performance-xl", "performance-2xl"):
        assert HEROKU_DYNO_SIZES[big][1] == 1.2
    assert all(v[1] == 1.0 for k, v in HEROKU_DYNO_SIZES.items() if k.startswith("private"))


def test_the_token_never_leaks_in_process(api, caplog, tmp_path):
    """Logs at DEBUG (httpx's and httpcore's too), exceptions, tracebacks and reprs."""
    caplog.set_level(logging.DEBUG)
    api.script(500, Stall(10.0), Reply(401, {"message": "Invalid credentials"}))
    r, fallback = restarter(api, timeout=1.0)
    r.restart("over")
    assert fallback.calls and len(api.requests) == 3
    api.script(Reply(404))
    with pytest.raises(ApiError) as caught:
        call(
            "DELETE",
            api.url + "/apps/x/dynos/y",
            headers={"Authorization": f"Bearer {Secret(TOKEN).reveal()}"},
            what="restart",
            refused={404: "no such app"},
            retries=0,
        )
    texts = [
        caplog.text,
        "\n".join(rec.getMessage() for rec in caplog.records),
        str(caught.value),
        repr(caught.value),
        "".join(traceback.format_exception(caught.value)),
        repr(r),
        str(Secret(TOKEN)),
        repr(Config(restart="heroku")),
    ]
    assert any("httpx" in rec.name or "httpcore" in rec.name for rec in caplog.records)
    for text in texts:
        assert TOKEN not in text
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(Secret(TOKEN))


def heroku_env(api: FakeAPI) -> dict[str, str]:
    return {
        "MEMWARDEN_RESTART": "heroku",
        "MEMWARDEN_HEROKU_API_URL": api.url,
        "MEMWARDEN_API_TIMEOUT": "2",
        "HEROKU_APP_NAME": "memwarden-test",
        "DYNO": "worker.1",
        "HEROKU_API_TOKEN": TOKEN,
    }


@pytest.mark.slow
def test_a_real_worker_drains_then_heroku_restarts_its_dyno(api, tmp_path):
    def dyno_manager(request: Request) -> None:
        # What Heroku does next: SIGTERM to the dyno's processes.
        os.kill(int((tmp_path / "journal.jsonl.pid").read_text()), signal.SIGTERM)

    api.script(503, Hook(dyno_manager, Reply(202, {})))
    proc, records = run_worker(tmp_path, heroku_env(api))
    assert proc.returncode == 0, proc.stderr[-3000:]
    deletes = [q for q in api.requests if q.method == "DELETE"]
    assert len(deletes) == 2  # one 503, retried
    assert deletes[-1].path == "/apps/memwarden-test/dynos/worker.1"
    assert deletes[-1].headers["accept"] == ACCEPT
    assert deletes[-1].headers["authorization"] == f"Bearer {TOKEN}"
    events = [r["event"] for r in records]
    assert events.index("restart") < events.index("drain") < events.index("job")
    job = next(r for r in records if r["event"] == "job")
    assert job["job_id"] == "job-1"
    # After the drain, not before: the job in flight finished before the first API call.
    assert job["ts"] <= deletes[0].t
    assert events[-1] == "sigterm"
    restart = next(r for r in records if r["event"] == "restart")
    assert restart["action"] == "heroku" and restart["in_flight"][0]["job_id"] == "job-1"
    assert TOKEN not in proc.stderr + proc.stdout


@pytest.mark.slow
def test_a_refused_token_falls_back_to_exit_and_never_leaks(api, tmp_path):
    """A real worker logging everything at DEBUG: the canary token appears nowhere."""
    api.script(500, Reply(401, {"id": "unauthorized", "message": "Invalid credentials provided."}))
    proc, records = run_worker(tmp_path, heroku_env(api))
    assert proc.returncode == 75, proc.stderr[-3000:]  # the local way: exit, EX_TEMPFAIL
    assert len(api.requests) == 2
    assert "HTTP 401: HEROKU_API_TOKEN was refused" in proc.stderr
    assert "restarting the local way instead (exit)" in proc.stderr
    assert "httpx" in proc.stderr  # httpx's own DEBUG logging was on
    journal_text = (tmp_path / "journal.jsonl").read_text()
    assert records and any(r["event"] == "restart" for r in records)
    for text in (proc.stdout, proc.stderr, journal_text):
        assert TOKEN not in text
    assert "Secret('***')" in proc.stdout  # the repr was printed, masked
