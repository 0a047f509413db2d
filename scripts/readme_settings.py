"""Rewrite README.md's settings table from memwarden.config.Config (``make readme``)."""

from __future__ import annotations

import pathlib

from memwarden.config import settings_markdown

START, END = "<!-- settings:start -->\n", "\n<!-- settings:end -->"


def main() -> None:
    readme = pathlib.Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(head + START + settings_markdown() + END + tail)


if __name__ == "__main__":
    main()
