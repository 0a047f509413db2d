"""Every ``--help`` shows each option's default and unit, and says the insider words
("grace", "gauge", "lifetime") in plain ones. The defaults of ``run`` come from
:class:`Config` itself."""

from __future__ import annotations

import dataclasses
import re

import click
import pytest
from click.testing import CliRunner

from memwarden.cli import COMMANDS, main
from memwarden.cli.options import METAVARS
from memwarden.config import Config, default_text, env_name

#: Options that do something rather than set something: no default to show.
ACTIONS = {"--help", "--version"}
FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def help_of(*args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def options_of(command: click.Command) -> list[click.Option]:
    return [
        p
        for p in command.params
        if isinstance(p, click.Option) and not ACTIONS & set(p.opts + p.secondary_opts)
    ]


def records(name: str) -> dict[str, str]:
    """``--option`` -> its help as ``name --help`` shows it."""
    command = main if name == "memwarden" else main.get_command(click.Context(main), name)
    assert command is not None
    ctx = click.Context(command, info_name=name)
    out = {}
    for option in options_of(command):
        record = option.get_help_record(ctx)
        assert record is not None, option.opts
        out[option.opts[-1]] = " ".join(record)
    return out


@pytest.mark.parametrize("name", ["memwarden", *sorted(COMMANDS)])
def test_every_option_shows_its_default(name: str) -> None:
    found = records(name)
    assert found, name
    for option, text in found.items():
        assert re.search(r"\(default: [^)]+", text), f"{name} {option}: {text}"


def test_run_shows_every_default_from_config_with_its_unit_and_variable() -> None:
    shown = help_of("run")
    found = records("run")
    settings = {o: o[2:].replace("-", "_") for o in found if o[2:].replace("-", "_") in FIELDS}
    assert len(settings) >= 15, found  # the settings of run are options made from Config
    for option, name in settings.items():
        f = FIELDS[name]
        text = found[option]
        assert f"(default: {default_text(f)}" in text, text
        assert env_name(f) in text, text
        kind = f.metadata["kind"]
        if kind in ("size", "duration", "signal"):
            assert text.startswith(f"{option} {METAVARS[kind]} "), text
            assert f"\n  {METAVARS[kind]} " in shown  # the unit is explained below
    assert "(default: 2m; MEMWARDEN_GRACE)" in " ".join(found["--grace"].split())
    assert default_text("grace") == "2m" and Config().grace == 120.0
    assert "(default: 5 per restart window;" in found["--max-early-exits"]


def test_run_says_the_insider_words_plainly() -> None:
    found = records("run")
    assert (
        "Grace: how long memory may stay over the soft limit before a graceful restart"
        in (found["--grace"])
    )
    assert "What memory is measured (the gauge)" in found["--measure"]
    assert "a lifetime (one run of CMD, start to restart)" in found["--max-restarts"]


def test_check_and_diagnose_say_the_insider_words_plainly() -> None:
    assert "gauge (what memory is measured" in " ".join(help_of("check").split())
    diagnose = " ".join(help_of("diagnose").split())
    assert "A lifetime: one worker process, from its start to its restart" in diagnose
