"""The ``memwarden`` command. Each command lives in its own module and is loaded on use."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from typing import Any

import click

from memwarden.units import SettingError

#: name -> "module:attribute" of a click command, imported only when run or listed.
COMMANDS = {
    "check": "memwarden.cli:check",
    "demo": "memwarden.demo:demo",
    "run": "memwarden.supervise:run",
    "diagnose": "memwarden.diagnose:diagnose_command",
    "report": "memwarden.report:report_command",
    "status": "memwarden.status:status",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        command: click.Command = getattr(importlib.import_module(module), attr)
        return command


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail.")
@click.version_option(package_name="memwarden")
def main(verbose: bool) -> None:
    """Keep workers inside their memory quota without losing a job."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def fail_on_setting(exc: SettingError) -> None:
    click.echo(f"memwarden: bad setting: {exc}", err=True)
    sys.exit(2)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object (sizes in bytes).")
@click.option(
    "--celery-app",
    metavar="MODULE:APP",
    help="Also check a Celery app's no-loss settings (acks_late, reject_on_worker_lost).",
)
def check(as_json: bool, celery_app: str | None) -> None:
    """Print what memwarden sees here: platform, quota, gauge, limits, allocator."""
    from memwarden.check import EXTRA_CHECKS, inspect, render

    if celery_app:
        try:
            integration = importlib.import_module("memwarden.integrations.celery")
            EXTRA_CHECKS.append(integration.check_app(celery_app))
        except Exception as exc:
            click.echo(f"memwarden: cannot load Celery app {celery_app!r}: {exc}", err=True)
            sys.exit(2)
    try:
        report: dict[str, Any] = inspect()
    except SettingError as exc:
        fail_on_setting(exc)
        return
    click.echo(json.dumps(report, indent=2) if as_json else render(report))


if __name__ == "__main__":  # pragma: no cover - `python -m memwarden.cli`
    main()
