"""``memwarden status``: the fleet as its wardens' heartbeats tell it (Redis)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from memwarden import redact
from memwarden.units import format_duration, format_size

COLUMNS: tuple[str, ...] = ("FLEET", "WORKER", "PID", "FRAMEWORK", "MEMORY", "SOFT", "HARD")
COLUMNS += ("STATE",)
COLUMNS += ("RESTARTS/1H", "OOM KILLS", "PSI10 SOME/FULL", "LAST CULPRIT", "UPTIME", "SEEN")


def rows(report: dict[str, Any], now: float) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for w in report["wardens"]:
        out.append(
            (
                str(w.get("fleet") or "-"),
                str(w.get("host") or "-"),
                str(w.get("pid") or "-"),
                str(w.get("framework") or "-"),
                format_size(w.get("memory")),
                format_size(w.get("soft_limit")),
                format_size(w.get("hard_limit")),
                str(w.get("state") or "-") + (" (dry run)" if w.get("dry_run") else ""),
                str(w.get("restarts_1h", "-")),
                str(w.get("oom_kills", "-")),
                _pressure(w),
                str(w.get("last_culprit") or "-"),
                format_duration(float(w.get("uptime_s") or 0)),
                f"{max(0.0, now - float(w.get('ts') or now)):.0f}s ago",
            )
        )
    return out


def _pressure(w: dict[str, Any]) -> str:
    """``1.2/0.4%`` (some/full, avg10), ``*`` when it is the system's, not the cgroup's."""
    some, full = w.get("psi_some10"), w.get("psi_full10")
    if some is None or full is None:
        return "-"
    return f"{some:.1f}/{full:.1f}%" + ("*" if w.get("psi_src") == "system" else "")


def fleet_table(report: dict[str, Any], now: float | None = None) -> str:
    """The fleet as ``memwarden status`` prints it: a row per warden."""
    now = time.time() if now is None else now
    table = [COLUMNS, *rows(report, now)]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    if not report["wardens"]:
        lines.append("(no live warden: none has sent a heartbeat lately)")
    for fleet, holders in sorted(report["restarting"].items()):
        lines.append(f"restarting in {fleet}: {', '.join(holders)}")
    if any(w.get("psi_src") == "system" for w in report["wardens"]):
        lines.append("(* memory pressure of the whole machine: the cgroup keeps none, cgroup v1)")
    bad = report.get("malformed", 0)
    if bad:
        lines.append(f"({bad} malformed heartbeat{'' if bad == 1 else 's'} skipped)")
    return "\n".join(lines)


@click.command()
@click.option(
    "--redis",
    "url",
    default=None,
    metavar="URL",
    help="Redis of the fleet (default: $MEMWARDEN_REDIS_URL).",
)
@click.option("--fleet", default=None, help="Only this fleet (default: every fleet).")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object, sizes in bytes (default: a table for people).",
)
def status(url: str | None, fleet: str | None, as_json: bool) -> None:
    """Show the live wardens of the fleet: memory, limits, state, restarts, last culprit."""
    from memwarden.fleet import connect, read_fleet

    url = url or os.environ.get("MEMWARDEN_REDIS_URL")
    if not url:
        click.echo(
            "memwarden: no Redis: pass --redis URL or set MEMWARDEN_REDIS_URL "
            "(for example MEMWARDEN_REDIS_URL=redis://localhost:6379/0)",
            err=True,
        )
        sys.exit(2)
    try:
        report = read_fleet(connect(url), fleet)
    except ImportError:
        click.echo(
            "memwarden: status needs the redis package: pip install memwarden[redis]", err=True
        )
        sys.exit(2)
    except (OSError, ValueError) as exc:  # a bad URL
        click.echo(
            f"memwarden: cannot read Redis {redact.url(url)}: {type(exc).__name__}", err=True
        )
        sys.exit(1)
    except Exception as exc:  # redis errors: connection refused, auth, timeouts
        if type(exc).__module__.startswith("redis"):
            click.echo(
                f"memwarden: cannot read Redis {redact.url(url)}: {type(exc).__name__}", err=True
            )
        else:  # not Redis's fault: say what it was, not a traceback
            shown = redact.text(str(exc), known=[url])
            click.echo(f"memwarden: status failed: {type(exc).__name__}: {shown}", err=True)
        sys.exit(1)
    click.echo(json.dumps(report, indent=2) if as_json else fleet_table(report))
