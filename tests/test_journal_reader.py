"""The journal reader never raises, whatever the bytes; diagnose never raises on what it reads.

A fuzz test (hypothesis) over raw bytes, gzip streams cut or corrupted anywhere, and
journal-shaped records whose fields take any JSON value; then the reader's specifics: line
numbers, long lines, rotated files in any order, gzip members, stdin."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memwarden.analysis import read as journal_reader
from memwarden.analysis.diagnose import analyse, analyse_files, verdict_text
from memwarden.analysis.read import MAX_LINE, ReadSummary, check, job_fields, read_journals

DEFAULT_PARSE = journal_reader.parse
PARSERS = [journal_reader.parse_stdlib] + (
    [DEFAULT_PARSE] if DEFAULT_PARSE is not journal_reader.parse_stdlib else []
)

MB = 1024 * 1024
FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def judge(path: str) -> tuple[dict, ReadSummary]:
    """Read and judge one file as the commands do, with each parser there is (the standard
    library's, and orjson's when installed); nothing may escape, both give one verdict."""
    results = []
    for parser in PARSERS:
        journal_reader.parse = parser
        try:
            results.append(_judge(path))
        finally:
            journal_reader.parse = DEFAULT_PARSE
    (first, summary), *others = results
    for result, _ in others:
        assert result["pattern"] == first["pattern"]
    return first, summary


def _judge(path: str) -> tuple[dict, ReadSummary]:
    summary = ReadSummary()
    analysis = analyse(read_journals([path], summary), summary, validated=True)
    result = analysis.result
    # the commands' path (each record handed on once, job records checked as read): the same
    fast_summary = ReadSummary()
    fast = analyse_files([path], fast_summary).result
    assert json.dumps(fast, default=str) == json.dumps(result, default=str)
    verdict_text(result)
    json.dumps(result, default=str)
    assert result["pattern"] in ("leak", "bloat", "stable", "unknown")
    assert summary.records + summary.bad <= summary.lines
    return result, summary


def write(tmp_path, data: bytes, name: str = "fuzz.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# ----------------------------------------------------------------------------- fuzz
@FUZZ
@given(data=st.binary(max_size=6000))
def test_any_bytes(tmp_path, data):
    judge(write(tmp_path, data))


@FUZZ
@given(data=st.binary(max_size=3000), cut=st.floats(0, 1), flip=st.integers(0, 10**6))
def test_any_gzip_cut_or_corrupted(tmp_path, data, cut, flip):
    packed = bytearray(gzip.compress(data, mtime=0))
    if flip % 3 == 0:
        i = flip % len(packed)
        packed[i] ^= 0xFF
    packed = packed[: max(2, int(len(packed) * cut))] if flip % 2 else packed
    judge(write(tmp_path, bytes(packed)))


ANY = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
SIZE = st.one_of(st.integers(min_value=1, max_value=2 * 1024 * MB), st.floats(1, 2e9), ANY)
EVENTS = ["job", "sample", "restart", "kill", "reclaim", "trace", "start", "exit", "oom_kill"]


@st.composite
def records(draw):
    """Journal-shaped records: the known events and fields, mostly sane, any value at all."""
    event = draw(st.sampled_from(EVENTS) | ANY)
    r = {"event": event, "ts": draw(st.floats(0, 2e9) | ANY), "pid": draw(st.integers(1, 5) | ANY)}
    fields = {
        "job": st.sampled_from(["a", "b", "c"]) | ANY,
        "rss_before": SIZE,
        "rss_after": SIZE,
        "duration_s": st.floats(0, 5) | ANY,
        "worker_pid": st.integers(1, 3) | ANY,
        "blocks": SIZE,
        "heap_in_use": SIZE,
        "mmapped": SIZE,
        "allocated": SIZE,
        "rss": SIZE,
        "total": SIZE,
        "limit": SIZE,
        "hard": SIZE,
        "freed": SIZE,
        "reason": st.sampled_from(["1 MiB over soft limit 2 MiB", "over hard limit"]) | ANY,
        "action": st.sampled_from(["signal", "recycle", "none"]) | ANY,
        "in_flight": ANY,
        "dry_run": ANY,
        "top": ANY,
        "supervisor": ANY,
        "host": ANY,
        "hostname": st.sampled_from(["h1", "h2"]) | ANY,
        "dyno": ANY,
        "peak_rss": SIZE,
        "blocks_before": SIZE,
        "heap_in_use_before": SIZE,
        "mmapped_before": SIZE,
        "allocated_before": SIZE,
        "kills": ANY,
    }
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=8, unique=True)):
        r[name] = draw(fields[name])
    return r


def dumps(r) -> str:
    try:
        return json.dumps(r)
    except ValueError:  # an integer too long for str(): as the raw digits would read
        return '{"event": "job", "ts": ' + "9" * 5000 + "}"


@FUZZ
@given(recs=st.lists(records(), max_size=60), zipped=st.booleans(), cut=st.floats(0, 1))
def test_any_records(tmp_path, recs, zipped, cut):
    text = "".join(dumps(r) + "\n" for r in recs).encode()
    if zipped:
        text = gzip.compress(text, mtime=0)
    text = text[: int(len(text) * cut)] if cut < 0.3 else text
    judge(write(tmp_path, text))
    # records handed over as they are (a library caller): validated on the way in
    analysis = analyse(list(recs))
    verdict_text(analysis.result)


@settings(max_examples=100, deadline=None)
@given(recs=st.lists(records(), min_size=1, max_size=30))
def test_check_says_why_or_lets_through(recs):
    for r in recs:
        why = check(r)
        assert why is None or isinstance(why, str)
        if why is None and r.get("event") == "job":
            assert isinstance(r["job"], str) and math.isfinite(r["rss_after"])
        if isinstance(r, dict) and r.get("event") == "job":  # the fast path, the same answer
            assert (job_fields(r) is not None) == (journal_reader._why(r) is None), r


# ----------------------------------------------------------------------------- specifics
def job(i: int, pid: int = 7, kind: str = "a", level: float = 100 * MB) -> dict:
    return {
        "event": "job",
        "ts": 1_700_000_000.0 + i,
        "pid": pid,
        "job": kind,
        "rss_before": int(level),
        "rss_after": int(level),
    }


def test_a_job_records_fields_are_in_the_order_its_readers_slice() -> None:
    """job_fields checks the first eight one by one, then JOB_SIZES; the digest takes the
    live figures after and before a job by slices of JOB_FIELDS; msgspec's JobLine gives
    its values in the same order."""
    fields = journal_reader.JOB_FIELDS
    assert fields[:8] == ("job", "pid", "worker_pid", "host", "hostname", "dyno", "ts", "rss_after")
    assert sorted(fields[8:]) == sorted(journal_reader.JOB_SIZES)
    assert len(set(fields)) == len(fields)
    assert fields[journal_reader.LIVE_AFTER_AT] == journal_reader.LIVE_AFTER
    assert fields[journal_reader.LIVE_BEFORE_AT] == journal_reader.LIVE_BEFORE
    if journal_reader.fast_jobs is not None:
        from memwarden.analysis.fast_job import JobLine

        assert JobLine.__struct_fields__ == fields


def test_a_line_too_long_is_skipped_without_being_held(tmp_path):
    lines = [json.dumps(job(i)) for i in range(30)]
    big = '{"event": "job", "junk": "' + "x" * (3 * MAX_LINE) + '"}'
    lines.insert(10, big)
    path = write(tmp_path, ("\n".join(lines) + "\n").encode())
    summary = ReadSummary()
    assert len(list(read_journals([path], summary))) == 30
    assert summary.bad == 1 and summary.bad_lines[0].line == 11
    assert "longer than" in summary.bad_lines[0].why


def test_rotated_files_are_read_oldest_first_whatever_their_order(tmp_path):
    """``journal.jsonl.1`` holds the older records: named after the live file (as a shell
    glob sorts them), it is still read first."""
    recs = [job(i, level=(100 + i * 0.5) * MB, kind="ab"[i % 2]) for i in range(400)]
    old = write(tmp_path, "".join(json.dumps(r) + "\n" for r in recs[:200]).encode(), "j.jsonl.1")
    new = write(tmp_path, "".join(json.dumps(r) + "\n" for r in recs[200:]).encode(), "j.jsonl")
    summary = ReadSummary()
    ts = [r["ts"] for r in read_journals([new, old], summary)]
    assert ts == sorted(ts) and len(ts) == 400
    result = analyse(read_journals([new, old]), validated=True).result
    assert result["evidence"]["lifetimes"] == 1 and result["pattern"] == "leak"


def test_gzip_members_crlf_and_stdin(tmp_path):
    recs = [job(i, level=(100 + i * 0.5) * MB, kind="ab"[i % 3 == 0]) for i in range(300)]
    first = "".join(json.dumps(r) + "\r\n" for r in recs[:150]).encode()
    second = "".join(json.dumps(r) + "\n" for r in recs[150:]).encode()
    data = gzip.compress(first, mtime=0) + gzip.compress(second, mtime=0)
    path = write(tmp_path, data, "j.log")
    summary = ReadSummary()
    assert len(list(read_journals([path], summary))) == 300 and summary.bad == 0
    out = subprocess.run(
        [sys.executable, "-m", "memwarden.cli", "diagnose", "-"],
        input=data,
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.startswith(b"Verdict: LEAK"), out.stderr


def test_a_directory_or_missing_file_is_a_problem_not_a_traceback(tmp_path):
    summary = ReadSummary()
    assert list(read_journals([str(tmp_path), str(tmp_path / "nope")], summary)) == []
    assert len(summary.unreadable) == 2 and all("cannot be opened" in p for p in summary.problems)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "memwarden.cli",
            "report",
            str(tmp_path / "nope"),
            "-o",
            os.path.join(tmp_path, "r.html"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "nope: cannot be opened" in out.stderr
    assert "Traceback" not in out.stderr


def test_deep_nesting_and_endless_digits_are_bad_lines(tmp_path):
    lines = [json.dumps(job(i)) for i in range(20)]
    lines.insert(5, "[" * 200_000)
    lines.insert(9, '{"event": "job", "ts": 1, "pid": 1, "job": "a", "rss_after": ' + "9" * 9000)
    lines.insert(12, '{"event": "job", "ts": 1, "pid": 1, "job": "a", "rss_after": 1e999}')
    path = write(tmp_path, ("\n".join(lines) + "\n").encode())
    summary = ReadSummary()
    assert len(list(read_journals([path], summary))) == 20
    assert [b.line for b in summary.bad_lines] == [6, 10, 13]
