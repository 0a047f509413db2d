"""report: a self-contained page, rendered in real headless Chromium."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

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
    assert 'class="restarts"' in dom and "soft_limit" in dom
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", f"file://{html_path}")
    assert shot.stat().st_size > 20_000  # a page with a chart on it, not a blank one


def test_png_is_the_main_chart(tmp_path):
    png = make_report(tmp_path, "mixed.jsonl.gz", "chart.png")
    with open(png, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert (width, height) == (1100, 480)


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
