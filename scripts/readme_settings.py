"""Rewrite the settings table of docs/configuration.md from memwarden.config.Config
(``make readme``)."""

from __future__ import annotations

import pathlib

from memwarden.config import settings_markdown

START, END = "<!-- settings:start -->\n", "\n<!-- settings:end -->"
PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def main() -> None:
    text = PAGE.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{PAGE}: no {START.strip()} … {END.strip()} block to rewrite")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    PAGE.write_text(head + START + settings_markdown() + END + tail)


if __name__ == "__main__":
    main()
