"""``memwarden run [OPTIONS] -- CMD``: the supervisor's command line."""

from __future__ import annotations

import sys
from typing import Any

import click

from memwarden.cli.options import UNITS, setting_flag, setting_option
from memwarden.config import closest
from memwarden.supervisor.run import Supervisor, settings
from memwarden.units import SettingError


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    epilog=UNITS,
)
@setting_option(
    "soft_limit",
    "Soft limit: when CMD's memory stays over it for the grace time, CMD is stopped "
    "gracefully (its jobs in hand finish) and started again",
)
@setting_option("hard_limit", "Hard limit: CMD is killed (SIGKILL) at once and started again")
@setting_option(
    "quota",
    "The memory quota, when it cannot be detected; the limits' percentages are shares of it",
)
@setting_option(
    "grace", "Grace: how long memory may stay over the soft limit before a graceful restart"
)
@setting_option(
    "shutdown_timeout", "How long CMD may take to stop after its stop signal before SIGKILL"
)
@setting_option("interval", "How often memory is read")
@setting_option(
    "min_uptime",
    "A restart that can wait waits until CMD has run this long; doubled per looping restart",
)
@setting_option(
    "max_restarts",
    "Looping restarts allowed: restarts of a lifetime (one run of CMD, start to restart) "
    "that began at 80% of the soft limit or more; past them CMD stays up over the soft "
    "limit, the hard limit still applies",
    per="per restart window",
)
@setting_option("restart_window", "The window --max-restarts and --max-early-exits count in")
@setting_option(
    "max_early_exits",
    "How many times CMD may die young (before --min-uptime, at least 1s) per restart window "
    "before run gives up",
    per="per restart window",
)
@setting_option("stop_signal", "CMD's graceful stop signal: finish the jobs in hand, then exit")
@setting_option(
    "drain_signal",
    "Sent to CMD as memory crosses the soft limit, before the stop signal: stop taking work; "
    "SIGTSTP for Sidekiq",
)
@setting_option(
    "measure",
    "What memory is measured (the gauge): cgroup (the container's, as the platform counts "
    "it), tree (CMD and its children), process (CMD alone); auto: cgroup when the quota is "
    "the cgroup's, else tree",
)
@setting_option("journal", "JSON-lines journal file: what happened and why, for memwarden diagnose")
@setting_flag("dry_run", "Decide and log, never signal or kill")
@click.option(
    "--no-status",
    is_flag=True,
    help="No live status line on a terminal (default: the line shows on a terminal).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(command: tuple[str, ...], no_status: bool, **options: Any) -> None:
    """Run CMD and keep it inside its memory limit.

    memwarden run [OPTIONS] -- CMD [ARGS]...
    """
    from memwarden.cli import fail_on_setting

    if command and command[0].startswith("-") and command[0] != "--":
        # An option click did not know (ignore_unknown_options): a typo, not the command.
        names = [o for p in run_command_params() for o in p.opts]
        near = closest(command[0].partition("=")[0], names)
        hint = f" (did you mean {near}?)" if near else ""
        raise click.UsageError(f"no such option {command[0]}{hint}")
    try:
        resolved = settings(**options)
    except SettingError as exc:
        fail_on_setting(exc)
        return
    sys.exit(Supervisor(command, resolved, status=not no_status).run())


def run_command_params() -> list[click.Parameter]:
    """The options of ``memwarden run`` (for a typo's closest name)."""
    return [p for p in run.params if isinstance(p, click.Option)]
