"""Django Tasks (``django-tasks`` with its database backend) under memwarden: real
PostgreSQL, real ``manage.py db_worker`` processes in real memory cgroups, restarted by a
loop as a platform would.

``db_worker`` claims a task by setting its row to RUNNING, and nothing in it brings back
the row of a worker that died: ``memwarden.django`` does, for memwarden's own kill (before
it) and for any other death (the next guarded worker's sweep)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apps.django_harness import SITE, SRC, counts, django_env, enqueue, journal, row, worker_argv
from apps.rq_harness import WorkerLoop
from cgroups import memory_cgroup
from conftest import QUICK_LADDER, need_service, wait_for
from memwarden.integrations.django import SWEEP_EVERY
from memwarden.records import problems

MB = 1024 * 1024
QUARANTINED = "memwarden.integrations.django.Quarantined"

pytestmark = pytest.mark.slow


def _settings(**more: str) -> dict[str, str]:
    return {
        **QUICK_LADDER,
        "MEMWARDEN_SOFT_LIMIT": "150MiB",
        "MEMWARDEN_HARD_LIMIT": "300MiB",
        **more,
    }


def test_task_killed_at_the_hard_limit_comes_back_and_poison_is_quarantined(
    tmp_path: Path,
) -> None:
    """A task crossing the hard limit is killed with its worker, back to READY before the
    kill and run again by the next worker (once to the end); a task that crosses it at
    every run is quarantined (FAILED, memwarden's error) after ``poison_kills`` kills, and
    the queue goes on."""
    need_service("PostgreSQL", 5432)
    with (
        django_env(tmp_path, **_settings()) as env,
        memory_cgroup(1024 * MB) as cg,
        WorkerLoop(worker_argv(), env, tmp_path / "worker.log", cg) as loop,
    ):
        once = enqueue(env, "hog", 1, 400, True)
        wait_for(lambda: counts(env, "done").get(1), 90, what="the killed task, run again")
        assert row(env, once)["status"] == "SUCCESSFUL"
        assert [w.endswith(" (killed)") for w in row(env, once)["worker_ids"]] == [True, False]
        kills = journal(env, "kill")
        assert [[j["job_id"] for j in k["in_flight"]] for k in kills] == [[once]]

        poison = enqueue(env, "hog", 2, 400)
        after = enqueue(env, "note", 3)
        wait_for(lambda: row(env, poison)["status"] == "FAILED", 120, what="the quarantine")
        assert row(env, poison)["error"] == QUARANTINED
        wait_for(lambda: counts(env, "done").get(3), 60, what="the task after the poison one")
        assert counts(env, "started")[2] == 2  # run at two kills, then never again
        assert row(env, after)["status"] == "SUCCESSFUL"
        assert counts(env, "done") == {1: 1, 3: 1}
        quarantines = journal(env, "quarantine")
        assert [(q["job_id"], q["kills"]) for q in quarantines] == [(poison, 2)]
        assert len(journal(env, "kill")) == 3
        assert cg.oom_kills() == 0
        assert all(status == -signal.SIGKILL for status in loop.exits)
    assert [p for r in journal(env) for p in problems(r)] == []  # the journal's schema


def test_task_of_a_worker_killed_outright_comes_back(tmp_path: Path) -> None:
    """A worker killed by the kernel's OOM killer (memwarden's limits out of reach) leaves
    its task RUNNING; the next guarded worker finds its advisory lock free and puts it back
    (a kill counted), and it runs once to the end."""
    need_service("PostgreSQL", 5432)
    settings = _settings(
        MEMWARDEN_SOFT_LIMIT="2GiB", MEMWARDEN_HARD_LIMIT="3GiB", MEMWARDEN_QUOTA="4GiB"
    )
    with (
        django_env(tmp_path, **settings) as env,
        memory_cgroup(256 * MB) as cg,
        WorkerLoop(worker_argv(), env, tmp_path / "worker.log", cg),
    ):
        task = enqueue(env, "hog", 1, 400, True)
        wait_for(lambda: counts(env, "done").get(1), 90, what="the task, back after the OOM kill")
        assert cg.oom_kills() >= 1
        assert row(env, task)["status"] == "SUCCESSFUL"
        assert counts(env, "started")[1] == 2
        rescues = [r for r in journal(env, "requeue") if r["by"] == "rescue"]
        assert [r["job_id"] for r in rescues] == [task]


def test_task_of_a_worker_killed_elsewhere_comes_back_from_a_running_worker(
    tmp_path: Path,
) -> None:
    """A worker is SIGKILLed from outside mid-task and not started again: another guarded
    worker, already running, puts its task back at its next sweep, and runs it."""
    need_service("PostgreSQL", 5432)
    with django_env(tmp_path, **_settings()) as env, memory_cgroup(1024 * MB) as cg:
        with open(tmp_path / "victim.log", "ab") as log:
            victim = subprocess.Popen(worker_argv(), env=env, stdout=log, stderr=log)
        try:
            task = enqueue(env, "nap", 1, 600)
            wait_for(lambda: counts(env, "started").get(1), 60, what="the task's start")
            ran_on = row(env, task)["worker_ids"][-1]
            assert ran_on.startswith(f"mw:{victim.pid}@")
            with WorkerLoop(worker_argv(), env, tmp_path / "survivor.log", cg) as survivor:
                wait_for(lambda: survivor.current, 30, what="the survivor")
                wait_for(
                    lambda: any(r["pid"] == survivor.current.pid for r in journal(env, "sample")),
                    60,
                    what="the survivor's warden",
                )
                assert row(env, task)["status"] == "RUNNING"  # the victim lives: left alone
                victim.send_signal(signal.SIGKILL)
                victim.wait(10)
                killed = time.monotonic()
                wait_for(lambda: counts(env, "started").get(1) == 2, 60, what="the task, back")
                assert time.monotonic() - killed < SWEEP_EVERY + 5
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait(10)
        assert row(env, task)["worker_ids"][0] == ran_on + " (killed)"
        assert [r["job_id"] for r in journal(env, "requeue") if r["by"] == "rescue"] == [task]


def test_intake_paused_over_the_soft_limit_then_drained_and_restarted(tmp_path: Path) -> None:
    """A task leaves the worker over its soft limit: no task starts while it is (the
    tasks queued behind wait), the worker drains and exits gracefully (status 0), the next
    one runs them, each once."""
    need_service("PostgreSQL", 5432)
    settings = _settings(MEMWARDEN_GRACE="60", MEMWARDEN_HARD_LIMIT="600MiB")
    # As a project sets them, in settings.MEMWARDEN: they win over the variables.
    settings["DJANGO_TEST_MEMWARDEN"] = json.dumps({"grace": 3})
    with (
        django_env(tmp_path, **settings) as env,
        memory_cgroup(1024 * MB) as cg,
        WorkerLoop(worker_argv(), env, tmp_path / "worker.log", cg) as loop,
    ):
        enqueue(env, "ballast", 1, 250)
        wait_for(lambda: journal(env, "pause"), 60, what="the pause")
        for n in (2, 3, 4):
            enqueue(env, "note", n)
        wait_for(lambda: journal(env, "restart"), 60, what="the restart")
        wait_for(lambda: len(counts(env, "done")) == 4, 60, what="the queued tasks")
        assert counts(env, "done") == {1: 1, 2: 1, 3: 1, 4: 1}
        assert counts(env, "started") == {1: 1, 2: 1, 3: 1, 4: 1}
        restart_at = journal(env, "restart")[0]["ts"]
        notes = [j for j in journal(env, "job") if j["job"] == "django_jobs.tasks.note"]
        assert len(notes) == 3 and all(j["ts"] > restart_at for j in notes)
        assert loop.exits and loop.exits[0] == 0
        assert not journal(env, "kill")
        assert cg.oom_kills() == 0
    assert [p for r in journal(env) for p in problems(r)] == []  # the journal's schema


def test_task_cut_by_a_forced_stop_goes_back_not_failed(tmp_path: Path) -> None:
    """``db_worker`` ends a task half-way on a second stop signal and marks it FAILED; under
    memwarden its row goes back to READY instead, and the next worker runs it to the end."""
    need_service("PostgreSQL", 5432)
    with (
        django_env(tmp_path, **_settings()) as env,
        memory_cgroup(1024 * MB) as cg,
        WorkerLoop(worker_argv(), env, tmp_path / "worker.log", cg) as loop,
    ):
        task = enqueue(env, "nap", 1, 5)
        wait_for(lambda: counts(env, "started").get(1), 60, what="the task's start")
        first = loop.current
        assert first is not None
        first.send_signal(signal.SIGTERM)
        wait_for(lambda: b"shutting down gracefully" in (tmp_path / "worker.log").read_bytes(), 30)
        first.send_signal(signal.SIGTERM)
        wait_for(lambda: counts(env, "done").get(1), 60, what="the task, run again")
        assert counts(env, "started")[1] == 2
        assert row(env, task)["status"] == "SUCCESSFUL"
        assert [r["job_id"] for r in journal(env, "put_back")] == [task]
        assert cg.oom_kills() == 0


def test_manage_py_check_says_which_settings_can_lose_a_task(tmp_path: Path) -> None:
    """``manage.py check`` (and ``memwarden check`` with ``DJANGO_SETTINGS_MODULE``) warn
    of a setting that leaves a task unrun; the test project's own settings are clean."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")},
        "PYTHONPATH": os.pathsep.join([str(SRC), str(SITE)]),
        "DJANGO_SETTINGS_MODULE": "django_site_settings",
        "MEMWARDEN_STATE_DIR": str(tmp_path / "state"),
    }
    manage = [sys.executable, str(SITE / "manage.py"), "check"]
    clean = subprocess.run(manage, env=env, capture_output=True, text=True, check=True)
    assert "memwarden." not in clean.stdout + clean.stderr
    env["MEMWARDEN_RESTART"] = "none"
    warned = subprocess.run(manage, env=env, capture_output=True, text=True, check=True)
    assert "(memwarden.W004) MEMWARDEN restart is none" in warned.stderr
    check = [sys.executable, "-m", "memwarden.cli", "check"]
    said = subprocess.run(check, env=env, capture_output=True, text=True, check=True)
    assert "django: JOBS CAN BE LOST: MEMWARDEN restart is none" in said.stdout
    env["DJANGO_TEST_MEMWARDEN"] = json.dumps({"soft_limt": "400MB"})
    typo = subprocess.run(manage, env=env, capture_output=True, text=True)
    assert typo.returncode != 0
    assert "did you mean soft_limit?" in typo.stderr
