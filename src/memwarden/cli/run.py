"""``memwarden run [OPTIONS] -- CMD``: the supervisor's command line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from memwarden.config import closest
from memwarden.supervisor.run import MAX_EARLY_EXITS_ENV, Supervisor, settings
from memwarden.units import SettingError

F = TypeVar("F", bound=Callable[..., Any])


def _option(name: str, help: str, **kw: Any) -> Callable[[F], F]:
    return click.option(f"--{name}", name.replace("-", "_"), default=None, help=help, **kw)


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_option("soft-limit", "Soft limit, e.g. 450MB or 85% (MEMWARDEN_SOFT_LIMIT).")
@_option("hard-limit", "Hard limit: SIGKILL at once (MEMWARDEN_HARD_LIMIT).")
@_option("quota", "The memory quota when it cannot be detected (MEMWARDEN_QUOTA).")
@_option("grace", "How long memory may stay over the soft limit (MEMWARDEN_GRACE).")
@_option("shutdown-timeout", "From the stop signal to SIGKILL (MEMWARDEN_SHUTDOWN_TIMEOUT).")
@_option("interval", "Sampling interval (MEMWARDEN_INTERVAL).")
@_option("min-uptime", "No soft restart before this uptime (MEMWARDEN_MIN_UPTIME).")
@_option("max-restarts", "Soft restarts per window (MEMWARDEN_MAX_RESTARTS).", type=int)
@_option("restart-window", "Window of the caps (MEMWARDEN_RESTART_WINDOW).")
@_option(
    "max-early-exits",
    f"Early exits per window before giving up ({MAX_EARLY_EXITS_ENV}).",
    type=int,
)
@_option("stop-signal", "CMD's graceful stop signal (MEMWARDEN_STOP_SIGNAL).")
@_option(
    "drain-signal",
    "Sent to CMD at the soft crossing, before the stop signal: stop taking work "
    "(SIGTSTP for Sidekiq; MEMWARDEN_DRAIN_SIGNAL).",
)
@_option("measure", "auto, cgroup, tree or process (MEMWARDEN_MEASURE).")
@_option("journal", "JSONL journal file (MEMWARDEN_JOURNAL).")
@click.option("--dry-run", "dry_run", is_flag=True, default=None, help="Decide and log, never act.")
@click.option("--no-status", is_flag=True, help="No live status line on a terminal.")
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
