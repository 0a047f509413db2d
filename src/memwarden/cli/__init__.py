"""The ``memwarden`` command. Each command lives in its own module and is loaded on use."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from memwarden.units import SettingError

#: name -> "module:attribute" of a click command, imported only when run or listed.
COMMANDS = {
    "check": "memwarden.cli.check:check",
    "demo": "memwarden.cli.demo:demo",
    "run": "memwarden.cli.run:run",
    "diagnose": "memwarden.cli.diagnose:diagnose",
    "report": "memwarden.cli.report:report",
    "status": "memwarden.cli.status:status",
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
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail (default: info and above).")
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


if __name__ == "__main__":  # pragma: no cover - `python -m memwarden.cli`
    main()
