"""``memwarden report JOURNAL... -o report.html``: the page, or the memory chart alone."""

from __future__ import annotations

import os
import re
import sys

import click

from memwarden.analysis.report import FORMATS, MissingExtra, build, memory_chart, pyplot
from memwarden.cli.diagnose import run_analysis

OUTPUT = "report.html"


def output_format(output: str) -> str:
    """``html`` or ``png`` by the file's extension; anything else is refused."""
    ext = os.path.splitext(output)[1].lower()
    if ext not in FORMATS:
        click.echo(
            f"memwarden: cannot write {output}: the report is a page (.html) or the memory "
            "chart alone (.png)",
            err=True,
        )
        sys.exit(2)
    return FORMATS[ext]


@click.command("report")
@click.argument("journals", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    default=OUTPUT,
    metavar="FILE",
    help=f"report.html (the page) or report.png (the memory chart alone) (default: {OUTPUT}).",
)
def report(journals: tuple[str, ...], output: str) -> None:
    """An HTML report (or PNG chart) from journal files (- for stdin; gzip is read as is).
    Exit status 1: nothing to report; 2: a file cannot be read, or an unknown -o format."""
    kind = output_format(output)
    try:
        pyplot()  # the extra is there, before reading a big journal
    except MissingExtra as exc:
        raise click.ClickException(str(exc)) from exc
    analysis, _ = run_analysis(journals)
    if kind == "png":
        fig = memory_chart(analysis)
        fig.savefig(output, format="png")
        pyplot().close(fig)
    else:
        page = re.sub(r"[ \t]+\n", "\n", build(analysis))
        with open(output, "w", encoding="utf-8") as f:
            f.write(page)
    click.echo(output)
