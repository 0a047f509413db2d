"""The README and docs/ hold together: every relative link leads to a file, every #anchor to
a heading of that page, and the README stays short enough to read (issue 16)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INSIDER = re.compile(r"\bthe (seed|ear)\b", re.IGNORECASE)


def prose(path: Path) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code cut out."""
    lines, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((n, re.sub(r"`[^`]*`", "", line)))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens;
    an underscore inside a word (``oom_kill``) stays, one that marks emphasis goes."""
    text = re.sub(r"(?<!\w)_|_(?!\w)", "", heading.strip().lower())
    text = re.sub(r"[`*]|<[^>]+>", "", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_with_code_spans(path):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m[2])
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def prose_with_code_spans(path: Path) -> list[tuple[int, str]]:
    """Like :func:`prose`, inline code kept (headings name commands in backticks)."""
    lines, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((n, line))
    return lines


def links(path: Path) -> list[tuple[int, str]]:
    return [(n, target) for n, line in prose(path) for target in LINK.findall(line)]


def test_slug_follows_github() -> None:
    assert slug("`memwarden run`: guard any command") == "memwarden-run-guard-any-command"
    assert slug("Leak or bloat: `memwarden diagnose`") == "leak-or-bloat-memwarden-diagnose"
    assert slug("Platforms: Heroku, Kubernetes, systemd") == "platforms-heroku-kubernetes-systemd"
    assert slug("`oom_kill`") == "oom_kill"
    assert slug("_Why_ it restarts") == "why-it-restarts"


def test_the_checker_finds_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [gone](missing.md) `[code](not-a-link.md)`\n")
    assert links(page) == [(3, "#top"), (3, "missing.md")]
    assert anchors(page) == {"top"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for n, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{page.name}:{n}: {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{page.name}:{n}: {target}: no heading #{anchor} in {dest.name}")
    assert not broken, "\n".join(broken)


def test_every_page_is_listed_in_the_index() -> None:
    index = {
        (ROOT / "docs" / t.partition("#")[0]).resolve()
        for _, t in links(ROOT / "docs" / "index.md")
    }
    unlisted = [p.name for p in PAGES[1:] if p.name != "index.md" and p.resolve() not in index]
    assert not unlisted, f"docs/index.md does not list {unlisted}"


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines: move detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_insider_words(page: Path) -> None:
    said = [f"{page.name}:{n}: {line.strip()}" for n, line in prose(page) if INSIDER.search(line)]
    assert not said, "words a newcomer cannot know:\n" + "\n".join(said)
