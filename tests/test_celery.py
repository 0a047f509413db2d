"""Celery guard, the parts that need no worker: settings, no-loss checks, ``memwarden check``."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from celery import Celery

from memwarden.celery import PoisonJobError, guard
from memwarden.integrations.celery import (
    AfterWarmShutdown,
    CeleryGuard,
    default_child_share,
    no_loss_problems,
    pool_kind,
    redis_visibility_note,
)
from memwarden.restart.exit import ExitRestarter
from memwarden.units import SettingError

MEMWARDEN = str(Path(sys.executable).with_name("memwarden"))


def fresh_app(**conf: object) -> Celery:
    app = Celery(f"t{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(conf)
    return app


def test_guard_rejects_a_bad_setting_naming_the_env_var() -> None:
    with pytest.raises(SettingError, match="MEMWARDEN_SOFT_LIMIT") as err:
        guard(fresh_app(), soft_limit="lots")
    assert "512MB" in str(err.value)  # an example of a good value
    with pytest.raises(SettingError, match="MEMWARDEN_CHILD_LIMIT"):
        guard(fresh_app(), child_limit="-3MB")


def test_a_child_share_is_what_the_main_process_leaves_under_the_soft_limit() -> None:
    mib = 1024 * 1024
    # 435 MiB soft, a 61 MiB worker before its pool: two children share the 374 MiB left.
    assert default_child_share(435 * mib, 61 * mib, 2) == 187 * mib
    assert default_child_share(435 * mib, 61 * mib, 1) == 374 * mib
    # A main process as big as a share (or bigger) leaves the old floor: soft / (c + 1).
    assert default_child_share(300 * mib, 200 * mib, 2) == 100 * mib
    assert default_child_share(300 * mib, 400 * mib, 2) == 100 * mib
    assert default_child_share(300 * mib, 0, 0) == 300 * mib  # no concurrency read: one child


def test_guard_in_a_process_that_only_sends_tasks_starts_nothing() -> None:
    threads = threading.active_count()
    app = fresh_app()
    g = guard(app, soft_limit="300MB", reclaim=False)
    assert isinstance(g, CeleryGuard) and g.config.reclaim is False
    app.send_task("anything", args=(1,))  # the in-memory broker takes it
    assert g.warden is None and threading.active_count() == threads


def test_defaults_lose_jobs_and_the_problems_say_how_to_fix_them() -> None:
    problems = no_loss_problems(fresh_app())
    assert len(problems) == 2
    assert "Set task_acks_late = True" in problems[0]
    assert "Set task_reject_on_worker_lost = True" in problems[1]


def test_safe_settings_pass_but_a_task_that_opts_out_is_named() -> None:
    app = fresh_app(task_acks_late=True, task_reject_on_worker_lost=True)

    @app.task(name="safe")
    def safe() -> None: ...

    assert no_loss_problems(app) == []

    @app.task(name="risky", acks_late=False)
    def risky() -> None: ...

    assert no_loss_problems(app) == ["task risky sets acks_late=False: it is lost if killed"]


def test_redis_broker_note_gives_the_visibility_timeout() -> None:
    app = fresh_app(broker_url="redis://127.0.0.1:6379/1")
    assert "visibility_timeout (3600 s)" in (redis_visibility_note(app) or "")
    app.conf.broker_transport_options = {"visibility_timeout": 300}
    assert "(300 s)" in (redis_visibility_note(app) or "")
    assert redis_visibility_note(fresh_app(broker_url="amqp://guest@localhost//")) is None


def test_pool_kinds() -> None:
    assert pool_kind("prefork") == "prefork"
    assert pool_kind("threads") == "threads"
    assert pool_kind("solo") == "solo"


def test_restart_actions_after_the_warm_shutdown() -> None:
    calls: list[tuple[str, bool]] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def restart(self, reason: str) -> None:
            calls.append((self.name, reason == "end"))

    class FakeExit(ExitRestarter):
        def restart(self, reason: str) -> None:
            calls.append((self.name, reason == "end"))

    for inner in (Fake("signal"), Fake("heroku"), FakeExit(75)):
        after = AfterWarmShutdown(inner)
        after.restart("drained")  # from the warden, nothing in flight
        after.restart("end", at_shutdown=True)  # from worker_shutdown
    # signal: the warm shutdown is enough; an API call once, at the first chance; an exit
    # only at the end, after the broker connection's clean close.
    assert calls == [("heroku", False), ("exit", True)]


def test_poison_error_is_importable_for_result_backends() -> None:
    exc = PoisonJobError("memwarden: quarantined")
    assert type(exc).__module__ == "memwarden.integrations.celery"


def write_app(tmp_path: Path, safe: bool) -> None:
    settings = "task_acks_late=True, task_reject_on_worker_lost=True" if safe else ""
    (tmp_path / "proj_celery.py").write_text(
        "from celery import Celery\n"
        "app = Celery('proj', broker='redis://127.0.0.1:6379/1')\n"
        f"app.conf.update({settings})\n"
    )


@pytest.mark.parametrize("safe", [False, True])
def test_memwarden_check_reports_a_celery_apps_settings(tmp_path: Path, safe: bool) -> None:
    write_app(tmp_path, safe)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    out = subprocess.run(
        [MEMWARDEN, "check", "--celery-app", "proj_celery:app"],
        cwd=tmp_path,
        env={**env, "MEMWARDEN_SOFT_LIMIT": "300MB"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    lost = [line for line in out.splitlines() if "JOBS CAN BE LOST" in line]
    if safe:
        assert lost == []
    else:
        assert len(lost) == 2 and "task_acks_late" in lost[0]
    assert "visibility_timeout (3600 s)" in out


def test_memwarden_check_fails_clearly_on_an_unknown_app(tmp_path: Path) -> None:
    done = subprocess.run(
        [MEMWARDEN, "check", "--celery-app", "no_such_module:app"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "cannot load Celery app 'no_such_module:app'" in done.stderr
