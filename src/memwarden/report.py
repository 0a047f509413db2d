"""``memwarden report JOURNAL... -o report.html``: one self-contained page (extra ``report``).

Memory over time per process lifetime with the soft/hard limits and restart, reclaim and
kill markers; the verdict and suspects of :mod:`memwarden.diagnose`; growth per job kind;
restart reasons. Charts are drawn by matplotlib (Agg) as inline SVG, text as paths, so the
page needs no network, font or script. ``-o report.png`` writes the main chart alone.
"""

from __future__ import annotations

import html
import io
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import click

from memwarden.diagnose import Lifetime, _reason, diagnose, lifetimes, load
from memwarden.units import format_size

MiB = 1024 * 1024
MAX_POINTS = 2000  # per lifetime line; longer ones are thinned (keeping each bucket's max)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise click.ClickException("the report needs `pip install memwarden[report]`") from exc
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "path"
    matplotlib.rcParams["svg.hashsalt"] = "memwarden"
    import matplotlib.pyplot as plt

    return plt


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    step = len(points) / MAX_POINTS
    out = []
    for b in range(MAX_POINTS):
        chunk = points[int(b * step) : max(int((b + 1) * step), int(b * step) + 1)]
        out.append(max(chunk, key=lambda p: p[1]))
    return out


def memory_chart(lives: list[Lifetime]) -> Any:
    """Memory (MiB) over time since the first record, one line per lifetime."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4.8), dpi=100)
    t0 = min((life.start for life in lives), default=0.0)
    span = max((r["ts"] for life in lives for r in life.jobs + life.samples), default=t0) - t0
    unit, per = ("seconds", 1.0) if span < 120 else ("minutes", 60.0)
    if span > 3 * 3600:
        unit, per = "hours", 3600.0
    limits: dict[str, list[tuple[float, float]]] = defaultdict(list)
    markers: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for n, life in enumerate(lives):
        pts = [((j["ts"] - t0) / per, j["rss_after"] / MiB) for j in life.jobs]
        pts += [
            ((s["ts"] - t0) / per, (s.get("total") or s.get("rss") or 0) / MiB)
            for s in life.samples
        ]
        pts.sort()
        if not pts:
            continue
        xs, ys = zip(*_thin(pts), strict=True)
        label = f"pid {life.pid}" if len(lives) <= 8 else ("lifetimes" if n == 0 else None)
        ax.plot(xs, ys, lw=1.1, label=label, color=None if len(lives) <= 8 else "C0")
        for s in life.samples:
            for key in ("limit", "hard"):
                if s.get(key):
                    limits[key].append(((s["ts"] - t0) / per, s[key] / MiB))
        for event, recs in (
            ("reclaim", life.reclaims),
            ("restart", life.restarts),
            ("kill", life.kills),
        ):
            for r in recs:
                y = r.get("total") or r.get("rss_before") or r.get("rss_after") or 0
                markers[event].append(((r["ts"] - t0) / per, y / MiB))
    top = max((y for line in ax.get_lines() for y in line.get_ydata()), default=0.0)
    for key, style, name in (("limit", "--", "soft limit"), ("hard", ":", "hard limit")):
        if limits[key]:
            xs, ys = zip(*sorted(limits[key]), strict=True)
            if top and max(ys) > 3 * top:  # far above the curve: a note, not a line
                name += f" {max(ys):,.0f} MiB (off the chart)"
                ys = tuple(float("nan") for _ in ys)
            ax.step(xs, ys, where="post", ls=style, color="0.35", lw=1, label=name)
    for event, (marker, color) in {
        "reclaim": ("^", "tab:green"),
        "restart": ("v", "tab:red"),
        "kill": ("X", "black"),
    }.items():
        if markers[event]:
            xs, ys = zip(*markers[event], strict=True)
            ax.scatter(xs, ys, marker=marker, color=color, s=42, zorder=5, label=event)
    ax.set_xlabel(f"{unit} since the first record")
    ax.set_ylabel("memory (MiB)")
    ax.set_title("Memory per process lifetime")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def kinds_chart(per_kind: list[dict[str, Any]]) -> Any:
    """Growth attributed to each kind next to the RSS growth seen inside its own jobs."""
    plt = _pyplot()
    kinds = [k["job"] for k in per_kind][:15]
    fig, ax = plt.subplots(figsize=(11, 0.45 * max(3, len(kinds)) + 1), dpi=100)
    ys = range(len(kinds))
    ax.barh(
        [y + 0.2 for y in ys],
        [k["attributed"] / MiB for k in per_kind[:15]],
        0.4,
        label="attributed by diagnose",
        color="tab:red",
    )
    ax.barh(
        [y - 0.2 for y in ys],
        [k["seen"] / MiB for k in per_kind[:15]],
        0.4,
        label="RSS growth seen in its own jobs",
        color="tab:gray",
    )
    ax.set_yticks(list(ys), kinds)
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.set_title("Memory growth per job kind")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    _pyplot().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def per_kind_table(lives: list[Lifetime], result: dict[str, Any]) -> list[dict[str, Any]]:
    runs: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    secs: Counter[str] = Counter()
    for life in lives:
        for j in life.jobs:
            runs[j["job"]] += 1
            seen[j["job"]] += max(0, j["rss_after"] - (j.get("rss_before") or j["rss_after"]))
            secs[j["job"]] += float(j.get("duration_s") or 0)
    attributed = {s["job"]: s["growth_bytes"] for s in result["suspects"]}
    rows = [
        {
            "job": k,
            "runs": runs[k],
            "seen": seen[k],
            "attributed": attributed.get(k, 0),
            "mean_s": secs[k] / runs[k],
        }
        for k in runs
    ]
    rows.sort(key=lambda r: (-r["attributed"], -r["seen"]))
    return rows


def _table(head: Sequence[str], rows: list[Sequence[Any]], cls: str) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left}th{background:#f3f3f3}.verdict{font-size:1.2em;font-weight:600}
.leak{color:#b00}.bloat{color:#b60}.stable{color:#070}figure{margin:0}svg{max-width:100%;height:auto}
code{background:#f6f6f6;padding:0 .2em}
"""


def build(records: list[dict[str, Any]], skipped: int = 0, title: str = "memwarden report") -> str:
    """The whole page as one HTML string."""
    lives, _ = lifetimes(records)
    result = diagnose(records, skipped)
    ev = result["evidence"]
    kinds = per_kind_table(lives, result)
    main = svg(memory_chart(lives))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="verdict {result["pattern"]}" id="verdict">{result["pattern"].upper()} '
        f"(confidence {result['confidence']:.2f})</p>",
        f"<p>{ev['jobs']} jobs in {ev['lifetimes']} process lifetime(s), {ev['kinds']} job "
        f"kinds; {ev['reclaims']} reclaims freed {format_size(ev['reclaimed_bytes'])}; "
        f"{result['skipped_lines']} malformed lines skipped.</p>",
        f'<figure id="memory-chart">{main}</figure>',
        "<h2>Suspects</h2>",
    ]
    if result["suspects"]:
        rows = []
        for s in result["suspects"]:
            top = (s.get("trace") or [{}])[0]
            site = f"{top.get('where', '')} {top.get('code', '')}".strip()
            rows.append(
                [
                    s["job"],
                    format_size(s["growth_bytes"]),
                    f"{s['share']:.0%}",
                    s["runs"],
                    format_size(s["per_run_bytes"]),
                    site,
                ]
            )
        parts.append(
            _table(
                ["job kind", "growth", "share", "runs", "per run", "traced at"], rows, "suspects"
            )
        )
    else:
        parts.append("<p>None: memory is stable.</p>")
    parts.append("<h2>Advice</h2><ul>")
    parts += [f"<li>{html.escape(a)}</li>" for a in result["advice"]]
    parts.append("</ul><h2>Growth per job kind</h2>")
    if kinds:
        parts.append(f'<figure id="kinds-chart">{svg(kinds_chart(kinds))}</figure>')
        parts.append(
            _table(
                ["job kind", "runs", "attributed growth", "RSS growth in own jobs", "mean time"],
                [
                    [
                        k["job"],
                        k["runs"],
                        format_size(k["attributed"]),
                        format_size(k["seen"]),
                        f"{k['mean_s']:.3f} s",
                    ]
                    for k in kinds
                ],
                "kinds",
            )
        )
    reasons: Counter[tuple[str, str, str]] = Counter()
    for life in lives:
        for r in life.restarts + life.kills:
            action = "kill" if r["event"] == "kill" else str(r.get("action") or "restart")
            dry = " (dry run)" if r.get("dry_run") else ""
            reasons[(_reason(r.get("reason")), action + dry, str(r.get("reason") or ""))] += 1
    parts.append("<h2>Restart reasons</h2>")
    if reasons:
        rows = [[k[0], k[1], k[2], n] for k, n in reasons.most_common()]
        parts.append(_table(["reason", "action", "last message", "count"], rows, "restarts"))
    else:
        parts.append("<p>No restarts or kills.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


@click.command("report")
@click.argument("journals", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    default="report.html",
    show_default=True,
    help="report.html (the page) or report.png (the main chart alone).",
)
def report_command(journals: tuple[str, ...], output: str) -> None:
    """An HTML report (or PNG chart) from journal files (- for stdin)."""
    try:
        records, bad = load(journals)
    except OSError as exc:
        raise click.ClickException(str(exc)) from exc
    if output.lower().endswith(".png"):
        lives, _ = lifetimes(records)
        fig = memory_chart(lives)
        fig.savefig(output, format="png")
        _pyplot().close(fig)
    else:
        page = build(records, bad)
        page = re.sub(r"[ \t]+\n", "\n", page)
        with open(output, "w", encoding="utf-8") as f:
            f.write(page)
    click.echo(output)
