"""``memwarden diagnose JOURNAL...``: leak, bloat or stable, and which job kind."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import click

from memwarden.analysis.diagnose import Analysis, analyse_files, verdict_text
from memwarden.analysis.read import ReadSummary


def run_analysis(journals: Sequence[str]) -> tuple[Analysis, ReadSummary]:
    """Read and judge journal files for a command; on unreadable input or nothing to
    judge, say why on stderr and exit (2: a file cannot be read, 1: nothing to judge)."""
    summary = ReadSummary()
    analysis = analyse_files(journals, summary)
    for line in summary.describe():
        click.echo(f"memwarden: {line}", err=True)
    if summary.unreadable:
        sys.exit(2)
    if "nothing" in analysis.result:
        click.echo(f"memwarden: {analysis.result['nothing']}", err=True)
        sys.exit(1)
    return analysis, summary


@click.command("diagnose")
@click.argument("journals", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (default: text for people).")
def diagnose(journals: tuple[str, ...], as_json: bool) -> None:
    """Leak, bloat or stable, and which job kind: from journal files (- for stdin; gzip
    is read as is). Exit status 1: nothing to judge; 2: a file cannot be read.

    A leak: live memory grows with the jobs (objects kept). Bloat: RSS grows while live
    memory does not (a fragmented heap). A lifetime: one worker process, from its start
    to its restart."""
    analysis, _ = run_analysis(journals)
    result = analysis.result
    click.echo(json.dumps(result, indent=2, default=str) if as_json else verdict_text(result))
