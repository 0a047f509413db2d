"""msgspec's job lines (``memwarden.analysis.fast_job``, the fast path of ``diagnose``): the same
records, with the same values, as :func:`memwarden.analysis.read.job_fields` lets through."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.test_journal_reader import DEFAULT_PARSE, dumps, records

from memwarden.analysis import read as journal_reader
from memwarden.analysis.read import job_fields

pytestmark = pytest.mark.skipif(journal_reader.fast_jobs is None, reason="needs msgspec")


def fast_job_agrees(line: str, complete: bool = True) -> None:
    """msgspec's decoder of job lines (when installed) lets through only what
    :func:`job_fields` lets through, with the same values (types too); and, ``complete``,
    every strict JSON line that job_fields lets through (orjson parses those)."""
    decode, job_line, errors, fields = journal_reader.fast_jobs
    try:
        decoded = decode(line)
    except errors:
        decoded = None
    try:
        parsed = journal_reader.parse_stdlib(line)
    except (ValueError, RecursionError):
        parsed = None
    ours = job_fields(parsed) if type(parsed) is dict and parsed.get("event") == "job" else None
    if type(decoded) is job_line:
        assert ours is not None, line
        theirs = fields(decoded)
        assert [(type(v), v) for v in theirs] == [(type(v), v) for v in ours], line
        assert journal_reader.has_live_keys(decoded) == journal_reader.has_live_keys(parsed)
        return
    if complete and ours is not None and DEFAULT_PARSE is not journal_reader.parse_stdlib:
        import orjson

        try:
            orjson.loads(line)
        except ValueError:
            return  # not strict JSON (NaN, integers past 64 bits): the usual path reads it
        raise AssertionError(f"msgspec refuses a job line job_fields takes: {line}")


@settings(max_examples=300, deadline=None)
@given(recs=st.lists(records(), min_size=1, max_size=30))
def test_msgspec_reads_a_job_line_as_job_fields_does(recs):
    for r in recs:
        fast_job_agrees(dumps(r))


@pytest.mark.parametrize(
    "line",
    [
        '{"job": "a", "ts": 1, "rss_after": 5}',  # no event: not a job record
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 5, "event": "sample"}',
        '{"event": "sample", "job": "a", "ts": 1, "rss_after": 5, "event": "job"}',
        '{"event": "job", "job": "a", "job": "b", "ts": 1, "rss_after": 5}',
        '{"event": "job", "job": "a", "ts": "x", "ts": 1, "rss_after": 5}',
        '{"event": "job", "job": "a", "ts": 1, "ts": "x", "rss_after": 5}',
        '{"event": "\\u006aob", "job": "a", "ts": 1, "rss_after": 5}',
        '{"event": "\\u0000", "job": "a", "ts": 1, "rss_after": 5}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 5, "blocks": null}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 5, "heap_in_use": null, "mmapped": 1}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 5.0, "pid": true}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": -0.0}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 0}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 5, "rss_before": 0}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 5, "mmapped": -1}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 5, "allocated_before": 2e16}',
        '{"event": "job", "job": "a", "ts": 99999999999, "rss_after": 5}',
        '{"event": "job", "job": "a", "ts": 100000000000, "rss_after": 5}',
        '{"event": "job", "job": "a", "ts": 99999999999.9, "rss_after": 5}',
        '{"event": "job", "job": "a", "ts": 1e11, "rss_after": 5}',
        '{"event": "job", "job": "a", "ts": -0.0, "rss_after": 1e-400}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 9007199254740992}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 9007199254740991}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 5, "x": 1e999}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 5, "x": NaN}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 5, "x": "\\udc00"}',
        '{"event": "job", "job": "' + "\U0001f600" * 500 + '", "ts": 1, "rss_after": 5}',
        '{"event": "job", "job": "' + "\U0001f600" * 501 + '", "ts": 1, "rss_after": 5}',
        '{"event": "job", "job": "", "ts": 1, "rss_after": 5}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 5, "host": 3}',
        '{"event": "job", "job": "a", "ts": 1, "rss_after": 5, "worker_pid": [1]}',
        '  {"event": "job", "job": "a", "ts": 1, "rss_after": 5}\r',
    ],
)
def test_msgspec_reads_these_job_lines_as_job_fields_does(line):
    """A repeated key may send a job line the usual way (slower, the same answer)."""
    fast_job_agrees(line, complete=not repeats_a_key(line))


def repeats_a_key(line: str) -> bool:
    seen: list[bool] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        seen.append(len({k for k, _ in items}) < len(items))
        return dict(items)

    try:
        json.loads(line, object_pairs_hook=pairs)
    except ValueError:
        return False
    return any(seen)
