"""Rewrite the records tables of docs/journal.md from memwarden.records.RECORDS
(``make readme``)."""

from __future__ import annotations

import pathlib

from memwarden.records import journal_markdown

START, END = "<!-- records:start -->\n", "<!-- records:end -->"
PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "journal.md"


def main() -> None:
    text = PAGE.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{PAGE}: no {START.strip()} … {END.strip()} block to rewrite")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    PAGE.write_text(head + START + journal_markdown() + "\n" + END + tail)


if __name__ == "__main__":
    main()
