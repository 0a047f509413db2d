"""report: a self-contained page, rendered in real headless Chromium."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TRACES = os.path.join(os.path.dirname(__file__), "data", "traces")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def make_report(tmp_path, name: str, out: str) -> str:
    path = str(tmp_path / out)
    subprocess.run(
        [sys.executable, "-m", "memwarden.cli", "report", os.path.join(TRACES, name), "-o", path],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return path


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing (apt-get install -y chromium)")
        pytest.skip("chromium is missing: apt-get install -y chromium")
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_page_is_self_contained(tmp_path):
    with open(make_report(tmp_path, "leak_restarts.jsonl.gz", "r.html")) as f:
        page = f.read()
    assert page.startswith("<!DOCTYPE html>")
    # nothing to fetch: no scripts, links, external images or fonts
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page and not re.search(r"url\((?!#)", page)  # only url(#clip)


def test_report_renders_in_headless_chromium(tmp_path):
    html_path = make_report(tmp_path, "leak_restarts.jsonl.gz", "r.html")
    dom = chromium(tmp_path, "--dump-dom", f"file://{html_path}").stdout
    # the verdict, the main chart (an inline SVG with drawn lines) and the tables
    assert re.search(r'id="verdict"[^>]*>\s*LEAK', dom)
    chart = dom[dom.index('id="memory-chart"') :]
    assert "<svg" in chart[:500] and chart.count("<path") > 20
    assert 'class="suspects"' in dom and "<td>build_pdf</td>" in dom
    assert 'class="kinds"' in dom and 'id="kinds-chart"' in dom
    assert 'class="restarts"' in dom and re.search(r"<td>soft limit, [a-z ]+</td>", dom)
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", f"file://{html_path}")
    assert shot.stat().st_size > 20_000  # a page with a chart on it, not a blank one


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_png_is_the_main_chart(tmp_path):
    """One panel per figure the journal holds: the whole worker's readings, and each
    process's RSS after its jobs (mixed has both: two panels)."""
    assert png_size(make_report(tmp_path, "mixed.jsonl.gz", "chart.png")) == (1100, 760)


def test_stable_journal_and_broken_lines(tmp_path):
    src = os.path.join(TRACES, "stable.jsonl.gz")
    with gzip.open(src, "rt") as f:
        lines = f.read().splitlines()
    journal = tmp_path / "j.jsonl"
    journal.write_text("\n".join([*lines, lines[-1][:20], "{"]) + "\n")
    out = tmp_path / "s.html"
    subprocess.run(
        [sys.executable, "-m", "memwarden.cli", "report", str(journal), "-o", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    page = out.read_text()
    assert "STABLE" in page and "None: memory is stable." in page
    assert "2 malformed lines skipped" in page
    assert json.loads(lines[0])["event"]  # the fixture is a real journal


# ----------------------------------------------------------------------------- one computation
MB = 1024 * 1024


def prefork_journal() -> list[dict]:
    """What a Celery prefork worker writes: the main process's samples (the cgroup's
    figure, with the limits), its pool children's job records (own RSS), and a child's
    recycles at its share (its USS) — 5 of them at 5 different MiB figures."""
    import random

    rnd = random.Random(81)
    out = []
    ts = 1_700_000_000.0
    for child in range(6):
        pid = 700 + child
        level = 40 * MB
        for i in range(120):
            ts += 0.5
            kind = rnd.choice(["shop.leak", "shop.email", "shop.email"])
            before = level
            if kind == "shop.leak":
                level += 1.2 * MB
            out.append(
                {
                    "event": "job",
                    "ts": ts,
                    "pid": pid,
                    "job": kind,
                    "rss_before": int(before),
                    "rss_after": int(level + rnd.gauss(0, 0.1 * MB)),
                    "duration_s": 0.2,
                }
            )
            if i % 4 == 0:
                out.append(
                    {
                        "event": "sample",
                        "ts": ts + 0.1,
                        "pid": 600,
                        "rss": 55 * MB,
                        "total": int(55 * MB + level * 2),
                        "limit": 400 * MB,
                        "hard": 480 * MB,
                        "gauge": "cgroup",
                    }
                )
        if child < 5:
            out.append(
                {
                    "event": "restart",
                    "ts": ts + 0.2,
                    "pid": pid,
                    "reason": f"{level / MB + child:.1f} MiB over soft limit 152.0 MiB for 0.0s",
                    "action": "recycle",
                    "total": int(level + child * MB),
                    "limit": 152 * MB,
                    "gauge": "uss",
                    "in_flight": [],
                }
            )
    return out


def write_journal(tmp_path, records, name="j.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def report_of(tmp_path, journal: str, out: str = "r.html") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memwarden.cli", "report", journal, "-o", str(tmp_path / out)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_verdict_suspects_tables_and_chart_from_one_computation(tmp_path):
    journal = write_journal(tmp_path, prefork_journal())
    done = report_of(tmp_path, journal)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "r.html").read_text()
    assert re.search(r'id="verdict"[^>]*>\s*LEAK', page)
    suspects = page[page.index('class="suspects"') :]
    assert re.search(r"<tbody><tr><td>shop\.leak</td>", suspects)
    kinds = page[page.index('class="kinds"') :]
    first_row = re.search(r"<tbody><tr>(.*?)</tr>", kinds).group(1)
    cells = re.findall(r"<td>(.*?)</td>", first_row)
    top_suspect = re.findall(r"<td>(.*?)</td>", re.search(r"<tbody><tr>(.*?)</tr>", suspects)[1])
    assert cells[0] == "shop.leak" and cells[2] == top_suspect[1]  # the same growth figure
    # the chart: the whole worker (cgroup, with its limits) and each process (RSS, with the
    # child's share that made the recycles), never one line of mixed figures
    chart = page[page.index('id="memory-chart"') :]
    for part in ("panel-whole", "panel-own", "soft-limit", "hard-limit", "child-share"):
        assert f'id="{part}' in chart, part
    assert 'id="marks-recycle' in chart
    # five recycles at five MiB figures: one row
    restarts = page[page.index('class="restarts"') :]
    rows = re.findall(r"<tr><td>", restarts)
    assert len(rows) == 1 and "<td>recycle</td><td>5</td>" in restarts


def test_output_format_is_chosen_by_extension_or_refused(tmp_path):
    journal = write_journal(tmp_path, prefork_journal())
    refused = report_of(tmp_path, journal, "r.pdf")
    assert refused.returncode == 2 and ".html" in refused.stderr and ".png" in refused.stderr
    assert not (tmp_path / "r.pdf").exists()
    assert report_of(tmp_path, journal, "R.HTM").returncode == 0
    assert (tmp_path / "R.HTM").read_text().startswith("<!DOCTYPE html>")
    assert report_of(tmp_path, journal, "c.png").returncode == 0
    assert png_size(str(tmp_path / "c.png")) == (1100, 760)


def test_nothing_to_report_fails_without_writing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    done = report_of(tmp_path, str(empty))
    assert done.returncode == 1 and "nothing to diagnose" in done.stderr
    assert not (tmp_path / "r.html").exists()


def test_run_journal_report_shows_the_kills_under_the_right_verdict(tmp_path):
    """Issue 14: the report of a command hard-killed five times drew the kill ramps under a
    green STABLE. Now: the verdict from the command's own figure, the kills at it, and the
    hard limit that made them."""
    with gzip.open(os.path.join(TRACES, "run_leak.jsonl.gz"), "rt") as f:
        records = [json.loads(line) for line in f if '"event": "job"' not in line]
    done = report_of(tmp_path, write_journal(tmp_path, records))
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "r.html").read_text()
    assert re.search(r'id="verdict"[^>]*>\s*LEAK', page)
    assert "No job records: verdict on the process only." in page
    chart = page[page.index('id="memory-chart"') :]
    assert 'id="panel-whole' in chart and 'id="hard-limit' in chart
    assert 'id="marks-kill' in chart and 'id="panel-own' not in chart
    assert "<td>hard limit</td><td>kill</td><td>5</td>" in page


def test_suspects_ranked_on_rss_with_jobs_at_once_carry_the_caveat(tmp_path):
    """Recorded: 4 threads at once, one kind keeping memory. By RSS alone the first suspect
    may be a neighbour, and the page says so under the suspects; with live memory it does
    not."""
    page = Path(make_report(tmp_path, "threads_leak_rss_only.jsonl.gz", "rss.html")).read_text()
    suspects = page[page.index("<h2>Suspects</h2>") : page.index("<h2>Advice</h2>")]
    caveat = re.search(r'<p class="note" id="attribution-caveat">Caution: ([^<]*)</p>', suspects)
    assert caveat and "RSS alone" in caveat[1] and "neighbour" in caveat[1], suspects
    live = Path(make_report(tmp_path, "threads_leak.jsonl.gz", "live.html")).read_text()
    assert 'class="suspects"' in live and "attribution-caveat" not in live
