"""Command options made from :class:`~memwarden.config.Config`'s settings.

Each shows its unit (the metavar), its default (from the setting, never written twice) and
the ``MEMWARDEN_*`` variable used when the option is absent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import click

from memwarden.config import RESTARTS, Config, default_text, env_name
from memwarden.gauges import MEASURES

F = TypeVar("F", bound=Callable[..., Any])

FIELDS = {f.name: f for f in dataclasses.fields(Config)}
#: The unit each kind of setting takes, as the metavar of its option.
METAVARS = {
    "size": "SIZE",
    "duration": "DURATION",
    "percent": "PERCENT",
    "int": "N",
    "signal": "SIGNAL",
    "path": "FILE",
    "url": "URL",
    "text": "TEXT",
}
CHOICES = {"restart": RESTARTS, "measure": MEASURES}
#: What the units mean, for a command's epilog (``\b``: click keeps the lines as they are).
UNITS = (
    "\b\n"
    "SIZE      450MB, 1.5GB (powers of 1000), 450MiB (of 1024), 85% (of the quota),\n"
    "          or a bare number of KiB\n"
    "DURATION  90s, 5m, 1h, 250ms, or a number of seconds\n"
    "SIGNAL    a name (SIGTERM, TERM) or a number\n"
    "Each option left out is read from its MEMWARDEN_* variable, else its default."
)


def setting_option(
    name: str, help: str | None = None, *, per: str = "", **kw: Any
) -> Callable[[F], F]:
    """``--name`` for the setting ``name``: ``help`` (default: the setting's own), then
    ``(default: ...; MEMWARDEN_...)`` with the default from :class:`Config` followed by
    ``per`` (``per restart window``). The value is None when the option is absent, so the
    variable can win."""
    f = FIELDS[name]
    kind = f.metadata["kind"]
    metavar = "|".join(CHOICES[name]) if name in CHOICES else METAVARS[kind]
    if kind == "int":
        kw.setdefault("type", int)
    shown = default_text(f) + (f" {per}" if per else "")
    return click.option(
        "--" + name.replace("_", "-"),
        name,
        default=None,
        metavar=metavar,
        help=described(f, help, shown),
        **kw,
    )


def setting_flag(name: str, help: str | None = None) -> Callable[[F], F]:
    """``--name``, an on/off setting turned on; None when absent (the variable decides)."""
    f = FIELDS[name]
    return click.option(
        "--" + name.replace("_", "-"),
        name,
        is_flag=True,
        default=None,
        help=described(f, help, default_text(f)),
    )


def described(f: dataclasses.Field[Any], help: str | None, default: str) -> str:
    """``Help text (default: 2m; MEMWARDEN_GRACE).``"""
    return f"{(help or f.metadata['help']).rstrip('.')} (default: {default}; {env_name(f)})."
