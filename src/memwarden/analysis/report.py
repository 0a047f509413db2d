"""``memwarden report JOURNAL... -o report.html``: one self-contained page (extra ``report``).

Everything on the page comes from one :func:`memwarden.analysis.diagnose.analyse` of the journal,
read once: the verdict, the suspects, the table of job kinds and the charts cannot
disagree. The memory chart has one figure per series, never two mixed in one line:

- **the whole worker**: the gauge's figure of each lifetime (cgroup working set, a process
  tree's PSS, or ``memwarden run``'s reading of its command), with the soft and hard limits
  and the restarts and kills they caused;
- **each process**: its own RSS after each job (or its readings, for a process that runs
  no jobs), with a pool child's share and the recycles it caused.

Restarts, recycles and kills are grouped by cause and action. Charts are drawn by
matplotlib (Agg) as inline SVG, text as paths, so the page needs no network, font or
script. ``-o report.png`` writes the memory chart alone; any other extension is refused.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Sequence
from typing import Any

from memwarden.analysis.diagnose import Analysis, pace_words
from memwarden.analysis.digest import Life
from memwarden.units import format_size

MiB = 1024 * 1024
MAX_POINTS = 2000  # per lifetime line; longer ones are thinned (keeping each bucket's max)
MAX_LINES = 8  # lifetimes drawn in their own colour and legend entry
FORMATS = {".html": "html", ".htm": "html", ".png": "png"}


class MissingExtra(RuntimeError):
    """matplotlib is not installed: the report needs ``pip install memwarden[report]``."""


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, with reproducible SVG output."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise MissingExtra("the report needs `pip install memwarden[report]`") from exc
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


class _Clock:
    """Seconds since the first record, in the unit that suits the journal's span."""

    def __init__(self, lives: list[Life]) -> None:
        self.t0 = min((life.first_ts for life in lives), default=0.0)
        span = max((life.last_ts for life in lives), default=self.t0) - self.t0
        self.unit, self.per = ("seconds", 1.0) if span < 120 else ("minutes", 60.0)
        if span > 3 * 3600:
            self.unit, self.per = "hours", 3600.0

    def __call__(self, ts: float) -> float:
        return (ts - self.t0) / self.per


def _whole(life: Life) -> list[tuple[float, float]]:
    s = life.samples
    return [(s.ts[i], s.tot[i]) for i in range(len(s))]


def _own(life: Life) -> list[tuple[float, float]]:
    j = life.jobs
    if len(j.n):
        return [(j.ts[i], j.hi[i]) for i in range(len(j.n))]
    if life.run:
        return []  # its readings are the command's whole figure: the other panel
    s = life.samples
    return [(s.ts[i], s.hi[i]) for i in range(len(s))]


def memory_chart(analysis: Analysis) -> Any:
    """The memory chart: one panel per figure that the journal holds (MiB)."""
    plt = pyplot()
    lives = analysis.lives
    clock = _Clock(lives)
    panels = [
        (name, fn)
        for name, fn in (("whole", _whole), ("own", _own))
        if any(fn(life) for life in lives)
    ] or [("own", _own)]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(11, 4.8 if len(panels) == 1 else 7.6), dpi=100, squeeze=False
    )
    for ax, (name, fn) in zip(axes[:, 0], panels, strict=True):
        ax.set_gid(f"panel-{name}")
        _lines(ax, lives, fn, clock)
        if name == "whole":
            _whole_thresholds(ax, lives, clock)
            ax.set_title("Whole worker: the figure the limits are checked against")
        else:
            _own_thresholds(ax, lives, clock)
            ax.set_title("Each process: its own RSS after each job (or its readings)")
        ax.set_ylabel("MiB")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8, ncol=3, framealpha=0.85)
    axes[-1, 0].set_xlabel(f"{clock.unit} since the first record")
    fig.tight_layout()
    return fig


def _lines(ax: Any, lives: list[Life], fn: Any, clock: _Clock) -> None:
    drawn = [life for life in lives if fn(life)]
    for n, life in enumerate(drawn):
        pts = sorted(_thin(fn(life)))
        xs = [clock(t) for t, _ in pts]
        ys = [v / MiB for _, v in pts]
        few = len(drawn) <= MAX_LINES
        label = f"pid {life.pid}" if few else ("lifetimes" if n == 0 else None)
        ax.plot(xs, ys, lw=1.1, label=label, color=None if few else "C0")


def _top(ax: Any) -> float:
    return max((max(line.get_ydata(), default=0.0) for line in ax.get_lines()), default=0.0)


def _whole_thresholds(ax: Any, lives: list[Life], clock: _Clock) -> None:
    soft = sorted((t, s) for life in lives for t, s, _ in life.limits if s)
    hard = sorted((t, h) for life in lives for t, _, h in life.limits if h)
    top = _top(ax)
    for pts, style, name in ((soft, "--", "soft limit"), (hard, ":", "hard limit")):
        if not pts:
            continue
        xs = [clock(t) for t, _ in pts] + [clock(max(life.last_ts for life in lives))]
        ys = [v / MiB for _, v in pts]
        ys.append(ys[-1])
        if top and max(ys) > 3 * top:  # far above the curve: a note, not a line
            name += f" {max(ys):,.0f} MiB (off the chart)"
            ys = [math.nan] * len(ys)
        (line,) = ax.step(xs, ys, where="post", ls=style, color="0.35", lw=1, label=name)
        line.set_gid("soft-limit" if style == "--" else "hard-limit")
    _marks(ax, lives, clock, {"restart", "kill", "reclaim"}, "total")
    ooms = [m.ts for life in lives for m in life.marks if m.event == "oom_kill"]
    for i, ts in enumerate(ooms):
        line = ax.axvline(clock(ts), color="purple", lw=1, label="OOM kill" if i == 0 else None)
        line.set_gid("oom-kill")


def _own_thresholds(ax: Any, lives: list[Life], clock: _Clock) -> None:
    shares = sorted(
        (m.ts, m.limit) for life in lives for m in life.marks if m.event == "recycle" and m.limit
    )
    if shares:
        xs = [clock(t) for t, _ in shares] + [clock(max(life.last_ts for life in lives))]
        ys = [v / MiB for _, v in shares]
        ys.append(ys[-1])
        (line,) = ax.step(
            xs, ys, where="post", ls="--", color="0.35", lw=1, label="pool child's share (USS)"
        )
        line.set_gid("child-share")
    _marks(ax, lives, clock, {"recycle"}, "own")
    reclaims_here = {"reclaim"}
    _marks(ax, lives, clock, reclaims_here, "own", only_without="total")


STYLE = {
    "reclaim": ("^", "tab:green"),
    "restart": ("v", "tab:red"),
    "recycle": ("v", "tab:orange"),
    "kill": ("X", "black"),
}


def _marks(
    ax: Any,
    lives: list[Life],
    clock: _Clock,
    events: set[str],
    figure: str,
    only_without: str | None = None,
) -> None:
    for event in sorted(events):
        pts = [
            (clock(m.ts), getattr(m, figure) / MiB)
            for life in lives
            for m in life.marks
            if m.event == event
            and getattr(m, figure)
            and (only_without is None or not getattr(m, only_without))
        ]
        if pts:
            marker, color = STYLE[event]
            xs, ys = zip(*pts, strict=True)
            dots = ax.scatter(xs, ys, marker=marker, color=color, s=42, zorder=5, label=event)
            dots.set_gid(f"marks-{event}")


def kinds_chart(rows: list[dict[str, Any]]) -> Any:
    """Growth attributed to each kind next to the RSS growth seen inside its own jobs."""
    plt = pyplot()
    rows = rows[:15]
    kinds = [k["job"] for k in rows]
    fig, ax = plt.subplots(figsize=(11, 0.45 * max(3, len(kinds)) + 1), dpi=100)
    ys = range(len(kinds))
    ax.barh(
        [y + 0.2 for y in ys],
        [k["attributed_bytes"] / MiB for k in rows],
        0.4,
        label="growth attributed (the verdict's)",
        color="tab:red",
    )
    ax.barh(
        [y - 0.2 for y in ys],
        [k["seen_bytes"] / MiB for k in rows],
        0.4,
        label="RSS growth seen inside its own jobs",
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
    pyplot().close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], cls: str) -> str:
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
code{background:#f6f6f6;padding:0 .2em}.note{color:#555}
"""


def build(analysis: Analysis, title: str = "memwarden report") -> str:
    """The whole page as one HTML string."""
    result = analysis.result
    ev = result["evidence"]
    pattern = result["pattern"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="verdict {pattern}" id="verdict">{pattern.upper()} '
        f"(confidence {result['confidence']:.2f})</p>",
        f"<p>{ev['jobs']} jobs in {ev['lifetimes']} process lifetime(s), {ev['kinds']} job "
        f"kinds; {ev['reclaims']} reclaims freed {format_size(ev['reclaimed_bytes'])} of the "
        f"processes' RSS; {result['skipped_lines']} malformed lines skipped.</p>",
    ]
    pace = pace_words(result.get("pace"), pattern)
    notes = ([pace] if pace else []) + result.get("notes", [])
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    parts.append(f'<figure id="memory-chart">{svg(memory_chart(analysis))}</figure>')
    parts += _suspects(result)
    parts.append("<h2>Advice</h2><ul>")
    parts += [f"<li>{html.escape(a)}</li>" for a in result["advice"]]
    parts.append("</ul>")
    parts += _kinds(result["kinds"])
    parts += _reasons(ev)
    parts += _input(result)
    parts.append("</body></html>")
    return "\n".join(parts)


def _suspects(result: dict[str, Any]) -> list[str]:
    out = ["<h2>Suspects</h2>"]
    if not result["suspects"]:
        out.append(f"<p>None: memory is {html.escape(result['pattern'])}.</p>")
        return out
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
    out.append(
        _table(["job kind", "growth", "share", "runs", "per run", "traced at"], rows, "suspects")
    )
    caveat = result["evidence"].get("attribution", {}).get("caveat")
    if caveat:
        out.append(f'<p class="note" id="attribution-caveat">Caution: {html.escape(caveat)}</p>')
    return out


def _kinds(rows: list[dict[str, Any]]) -> list[str]:
    out = ["<h2>Growth per job kind</h2>"]
    if not rows:
        out.append("<p>No job records.</p>")
        return out
    out.append(f'<figure id="kinds-chart">{svg(kinds_chart(rows))}</figure>')
    out.append(
        '<p class="note">"Attributed" is the verdict\'s: the suspects above. "Seen inside its '
        "own jobs\" is RSS growth between a job's start and end, which often lands in a later "
        "job than the one that caused it, or in any job that runs beside it.</p>"
    )
    out.append(
        _table(
            [
                "job kind",
                "runs",
                "growth attributed",
                "share",
                "RSS growth seen inside its own jobs",
                "biggest rise in one job",
                "mean time",
            ],
            [
                [
                    k["job"],
                    k["runs"],
                    format_size(k["attributed_bytes"]),
                    f"{k['share']:.0%}",
                    format_size(k["seen_bytes"]),
                    format_size(k["biggest_bytes"]),
                    f"{k['mean_s']:.3f} s",
                ]
                for k in rows[:40]
            ],
            "kinds",
        )
    )
    if len(rows) > 40:
        out.append(f"<p>… and {len(rows) - 40} more kinds.</p>")
    return out


def _reasons(ev: dict[str, Any]) -> list[str]:
    out = ["<h2>Restarts, recycles and kills</h2>"]
    groups = ev["restart_reasons"]
    if ev["oom_kills"]:
        out.append(f"<p>The kernel OOM-killed {ev['oom_kills']} process(es).</p>")
    if not groups:
        out.append("<p>No restarts, recycles or kills.</p>")
        return out
    rows = []
    for g in groups:
        low, high = g["low_bytes"], g["high_bytes"]
        at = (
            ""
            if low is None
            else format_size(low)
            if high == low
            else f"{format_size(low)} – {format_size(high)}"
        )
        limit = format_size(g["limit_bytes"]) if g["limit_bytes"] else ""
        rows.append([g["cause"], g["action"], g["count"], at, limit, g["last_reason"]])
    out.append(
        _table(["cause", "action", "count", "memory at", "limit", "last message"], rows, "restarts")
    )
    return out


def _input(result: dict[str, Any]) -> list[str]:
    read = result.get("input")
    if not read or not (read["bad_lines"] or read["problems"]):
        return []
    out = ["<h2>Input</h2><ul>"]
    out += [f"<li>{html.escape(p)}</li>" for p in read["problems"]]
    if read["bad_lines"]:
        out.append(
            f"<li>{read['bad_lines']} bad line(s) skipped of {read['lines']}: "
            + html.escape("; ".join(read["first_bad_lines"][:5]))
            + "</li>"
        )
    out.append("</ul>")
    return out
