"""Options typed for users: ``guard(app, soft_limt="1GB")`` is a type error in the editor.

``Options`` (a ``TypedDict``) holds every :class:`Config` setting with the type a user
passes; the integrations' ``guard``/``MemoryWarden``/RQ worker options and ``Warden`` take
``**options: Unpack[...]``. mypy itself is run on small snippets, against this checkout's
``src`` (``MYPYPATH``), with the project's own mypy settings.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import sys
import textwrap
import types
import typing
from pathlib import Path

import pytest

from memwarden.config import Config, Options, WardenOptions
from memwarden.warden import Warden

ROOT = Path(__file__).resolve().parent.parent
#: Settings that ``Warden`` takes as parameters of its own (also a Quota or a Journal).
WARDEN_OWN = {"quota", "journal"}


def test_options_has_every_setting_and_nothing_else() -> None:
    fields = [f.name for f in dataclasses.fields(Config)]
    assert set(Options.__annotations__) == set(fields)
    assert set(Options.__optional_keys__) == set(fields)  # total=False: every one optional
    assert set(WardenOptions.__annotations__) == set(fields) - WARDEN_OWN


def test_warden_takes_the_rest_as_its_own_parameters() -> None:
    params = inspect.signature(Warden.__init__).parameters
    assert {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} >= WARDEN_OWN


def test_each_default_is_of_the_type_users_pass() -> None:
    """The type of each key takes its setting's default, and None exactly when the
    default is None (unset): the TypedDict cannot drift from Config's fields."""
    hints = typing.get_type_hints(Options)
    for f in dataclasses.fields(Config):
        allowed = typing.get_args(hints[f.name]) or (hints[f.name],)
        assert (types.NoneType in allowed) == (f.default is None), f.name
        assert isinstance(f.default, allowed), (f.name, f.default, allowed)


def mypy(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(textwrap.dedent(code))
    env = {**os.environ, "MYPYPATH": str(ROOT / "src")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path.parent / "mypy-cache"),
            "--no-error-summary",
            "--hide-error-context",
            str(snippet),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def typed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One parent for the snippets, so the second mypy run reuses the first's cache."""
    return tmp_path_factory.mktemp("typed")


TYPOS = """\
    from celery import Celery

    from memwarden import Warden
    from memwarden.celery import guard
    from memwarden.rq import Worker

    app = Celery("shop")
    guard(app, soft_limt="1GB")
    Warden(soft_limt="1GB")
    guard(app, grace=[5])


    class ShopWorker(Worker):
        memwarden_options = {"soft_limt": "1GB"}
"""


def test_mypy_reports_a_misspelt_option(typed_dir: Path) -> None:
    (typed_dir / "typos").mkdir()
    done = mypy(typed_dir / "typos", TYPOS)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert any(
        re.search(r"snippet\.py:8: error: Unexpected keyword argument \"soft_limt\"", e)
        for e in errors
    ), done.stdout
    assert any(
        re.search(r"snippet\.py:9: error: Unexpected keyword argument \"soft_limt\"", e)
        for e in errors
    ), done.stdout
    assert any(re.search(r"snippet\.py:10: error: .*\"grace\"", e) for e in errors), done.stdout
    assert any(re.search(r"snippet\.py:14: error: .*\"soft_limt\"", e) for e in errors), done.stdout
    assert {int(e.split(":")[1]) for e in errors} == {8, 9, 10, 14}, done.stdout


def test_mypy_passes_options_spelt_right(typed_dir: Path) -> None:
    (typed_dir / "right").mkdir()
    done = mypy(
        typed_dir / "right",
        """\
        from celery import Celery
        from huey import RedisHuey

        import memwarden.arq
        import memwarden.huey
        from memwarden import Warden
        from memwarden.celery import guard
        from memwarden.config import Options
        from memwarden.dramatiq import MemoryWarden
        from memwarden.rq import Worker

        app = Celery("shop")
        guard(app, soft_limit="1GB", hard_limit=2 * 10**9, grace="2m", reclaim=False)
        guard(app, poison_url="redis://localhost:6379/1", stop_signal=15, interval=0.5)
        Warden(soft_limit="85%", journal="w.jsonl", quota="2GB", env={}, dry_run=True)
        MemoryWarden(soft_limit="400MB", restart="exit", pressure_full="40%")
        memwarden.arq.guard({}, soft_limit="400MB", shutdown_timeout=20)
        memwarden.huey.guard(RedisHuey("shop"), max_restarts=5, child_limit=None)


        class ShopWorker(Worker):
            memwarden_options = {"soft_limit": "400MB", "grace": 30}


        options: Options = {"soft_limit": "1GB", "measure": "tree"}
        guard(app, **options)
        Warden(**options)
        """,
    )
    assert done.returncode == 0, done.stdout + done.stderr
