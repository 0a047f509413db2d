"""Reading journals for ``diagnose`` and ``report``: whatever the bytes, nothing raises.

:func:`read_journals` streams the records of journal files (``-``: stdin) one by one, so a
reader holds one chunk of one file at a time, whatever the journal's size. What it meets on
the way goes into a :class:`ReadSummary` instead of an exception:

- gzip is chosen by content (the magic bytes), not by the file's name;
- a line that is not a JSON object, is longer than :data:`MAX_LINE`, or whose fields do not
  fit the schema (docs/journal.md "Records": a string ``rss_before``, a 10^400 or negative
  or NaN size, a list as pid, an event that is not a string) is counted and skipped, with its
  line number (the first :data:`KEEP_BAD` are kept for the message);
- a file that cannot be opened, a truncated or corrupt gzip stream, a closed or terminal
  stdin: a problem noted; the records read before it still count.

Rotated files (``journal.jsonl.3`` … ``journal.jsonl``) are read oldest first whatever the
order they are named in: each file's first record says where it belongs.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

#: The longest line read (a ``trace`` record with its sites is a few KiB).
MAX_LINE = 1 << 20
CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
#: Bad lines described one by one in the summary (all are counted).
KEEP_BAD = 20
#: Sizes are bytes below 2**53 (exact as floats); times are epoch seconds before year 5000.
MAX_SIZE = 2**53
MAX_TS = 1e11

Record = dict[str, Any]


@dataclass(frozen=True)
class BadLine:
    source: str
    line: int
    why: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.why}"


@dataclass
class ReadSummary:
    """What reading met: counts, the first bad lines, and problems with whole sources."""

    sources: list[str] = field(default_factory=list)
    lines: int = 0
    records: int = 0
    bad: int = 0
    bad_lines: list[BadLine] = field(default_factory=list)
    #: Sources read only in part, or not at all (with why).
    problems: list[str] = field(default_factory=list)
    #: Sources that could not be opened at all (a subset of ``problems``' sources).
    unreadable: list[str] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)

    def count(self, lines: int, records: int, jobs_taken: int) -> None:
        """A source read: its lines, its records, and of them the job records a reader
        took before they were counted by event."""
        self.lines += lines
        self.records += records + jobs_taken
        if jobs_taken:
            self.events["job"] += jobs_taken

    def skip(self, source: str, line: int, why: str) -> None:
        self.bad += 1
        if len(self.bad_lines) < KEEP_BAD:
            self.bad_lines.append(BadLine(source, line, why))

    def as_dict(self) -> dict[str, Any]:
        return {
            "sources": self.sources,
            "lines": self.lines,
            "records": self.records,
            "bad_lines": self.bad,
            "first_bad_lines": [str(b) for b in self.bad_lines],
            "problems": self.problems,
            "events": dict(self.events),
        }

    def describe(self, limit: int = 5) -> list[str]:
        """Human lines about what was skipped (nothing when all was read)."""
        out = [f"note: {p}" for p in self.problems]
        if self.bad:
            shown = "; ".join(str(b) for b in self.bad_lines[:limit])
            more = f" (and {self.bad - limit} more)" if self.bad > limit else ""
            out.append(f"skipped {self.bad} bad line(s) of {self.lines}: {shown}{more}")
        return out


# ----------------------------------------------------------------------------- schema
def _size(v: Any) -> bool:
    """A byte count: an int or float (not a bool), finite, 0 <= v < 2**53."""
    return type(v) in (int, float) and 0 <= v < MAX_SIZE


def _opt_size(r: Record, *keys: str) -> str | None:
    for k in keys:
        v = r.get(k)
        if v is not None and not _size(v):
            return f"{k} is not a size: {_short(v)}"
    return None


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


#: The live-memory figures (:func:`memwarden.trace.live_bytes`) a job record has after the
#: job, and the same before it.
LIVE_AFTER = ("blocks", "heap_in_use", "mmapped", "allocated")
LIVE_BEFORE = tuple(f"{name}_before" for name in LIVE_AFTER)
LIVE_FIELDS = tuple(name + suffix for name in LIVE_AFTER for suffix in ("", "_before"))


JOB_SIZES = ("rss_before", "duration_s", "peak_rss", *LIVE_FIELDS)
NUMBER = (int, float)
PID = (int, str)
#: A job record's fields in the order :func:`job_fields` gives their values: the first
#: eight checked one by one, then :data:`JOB_SIZES` (``tests/test_journal_reader.py``).
JOB_FIELDS = (
    *("job", "pid", "worker_pid", "host", "hostname", "dyno", "ts", "rss_after"),
    *("rss_before", "duration_s", *LIVE_AFTER, "peak_rss", *LIVE_BEFORE),
)
#: Where :data:`LIVE_AFTER` and :data:`LIVE_BEFORE` are in :data:`JOB_FIELDS`.
LIVE_AFTER_AT = slice(JOB_FIELDS.index(LIVE_AFTER[0]), JOB_FIELDS.index(LIVE_AFTER[-1]) + 1)
LIVE_BEFORE_AT = slice(JOB_FIELDS.index(LIVE_BEFORE[0]), JOB_FIELDS.index(LIVE_BEFORE[-1]) + 1)
_PID_OR_NONE = (int, str, type(None))
_TEXT_OR_NONE = (str, type(None))


def job_fields(r: Record) -> tuple[Any, ...] | None:
    """The values of :data:`JOB_FIELDS` (None where missing) of a dict whose event is
    ``job``, or None when :func:`check` refuses it (which then says why): the fast path
    of ``diagnose``, each field read once."""
    values: tuple[Any, ...] = tuple(map(r.get, JOB_FIELDS))
    kind, pid, wp, host, hostname, dyno, ts, after = values[:8]
    if (
        type(kind) is not str
        or not kind
        or len(kind) > 500
        or type(pid) not in _PID_OR_NONE
        or type(wp) not in _PID_OR_NONE
        or type(ts) not in NUMBER
        or not 0 <= ts < MAX_TS
        or type(after) not in NUMBER
        or not 0 < after < MAX_SIZE
    ):
        return None
    if not (host is None is hostname is dyno) and not (
        type(host) in _TEXT_OR_NONE
        and type(hostname) in _TEXT_OR_NONE
        and type(dyno) in _TEXT_OR_NONE
    ):
        return None
    for v in values[8:]:  # (a loop: cheaper here than builtins over the tuple)
        if v is not None and (type(v) not in NUMBER or not 0 <= v < MAX_SIZE):
            return None
    return values


def _job(r: Record) -> str | None:
    get = r.get
    kind = get("job")
    if type(kind) is not str or not kind or len(kind) > 500:
        return f"job kind is not a name: {_short(kind)}"
    after: Any = get("rss_after")
    if type(after) not in NUMBER or not 0 < after < MAX_SIZE:
        return f"rss_after is not a size: {_short(after)}"
    wp = get("worker_pid")
    if wp is not None and type(wp) not in PID:
        return f"worker_pid is not a pid: {_short(wp)}"
    for v in map(get, JOB_SIZES):  # the fast pass; which one is wrong is found after
        if v is not None and (type(v) not in NUMBER or not 0 <= v < MAX_SIZE):
            return _opt_size(r, *JOB_SIZES)
    return None


def _sample(r: Record) -> str | None:
    if not (_size(r.get("rss")) and r["rss"] > 0) and not (
        _size(r.get("total")) and r["total"] > 0
    ):
        return f"no reading: rss {_short(r.get('rss'))}, total {_short(r.get('total'))}"
    return _opt_size(r, "rss", "total", "limit", "hard")


def _reclaim(r: Record) -> str | None:
    return _opt_size(r, "freed", "rss_before", "rss_after", "total_before", "total_after")


def _stop(r: Record) -> str | None:
    for k in ("reason", "action"):
        if r.get(k) is not None and type(r[k]) is not str:
            return f"{k} is not text: {_short(r[k])}"
    if r.get("in_flight") is not None and type(r["in_flight"]) is not list:
        return f"in_flight is not a list: {_short(r['in_flight'])}"
    return _opt_size(r, "total", "limit")


def _trace(r: Record) -> str | None:
    if type(r.get("job")) is not str or type(r.get("top")) is not list:
        return "a trace record needs a job kind and a list of sites"
    return None


CHECKS: dict[str, Callable[[Record], str | None]] = {
    "job": _job,
    "sample": _sample,
    "reclaim": _reclaim,
    "restart": _stop,
    "kill": _stop,
    "trace": _trace,
    "oom_kill": lambda r: _opt_size(r, "kills", "limit"),
}


def check(r: Any) -> str | None:
    """Why ``r`` is not a usable journal record, or None when it is."""
    if type(r) is dict and r.get("event") == "job" and job_fields(r) is not None:
        return None
    return _why(r)


def _why(r: Any) -> str | None:
    """:func:`check` field by field: which one is wrong."""
    if type(r) is not dict:
        return f"not a JSON object: {_short(r)[:20]}"
    get = r.get
    event, pid = get("event"), get("pid")
    ts: Any = get("ts")
    if type(event) is not str or not event:
        return f"event is not a name: {_short(event)}"
    if type(ts) not in NUMBER or not 0 <= ts < MAX_TS:
        return f"ts is not a time: {_short(ts)}"
    if pid is not None and type(pid) not in PID:
        return f"pid is not a pid: {_short(pid)}"
    host, hostname, dyno = get("host"), get("hostname"), get("dyno")
    if host is not None or hostname is not None or dyno is not None:
        for k in ("host", "hostname", "dyno"):
            if r.get(k) is not None and type(r[k]) is not str:
                return f"{k} is not text: {_short(r[k])}"
    if event == "job":
        return _job(r)
    fn = CHECKS.get(event)
    return fn(r) if fn is not None else None


# ----------------------------------------------------------------------------- bytes
def _chunks(stream: IO[bytes], source: str, summary: ReadSummary) -> Iterator[bytes]:
    """The stream's bytes, gunzipped when they start with gzip's magic; a read error ends
    the stream with a problem noted (what came before it is kept)."""
    try:
        peek = getattr(stream, "peek", None)
        raw = _raw_chunks(stream)
        if peek is not None and peek(2)[:2] == GZIP_MAGIC:
            yield from _gunzip(raw, source, summary)
        else:
            yield from raw
    except (OSError, zlib.error, ValueError, EOFError) as exc:
        summary.problems.append(f"{source}: cannot be read to the end ({exc}); read up to there")


def _raw_chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


def _gunzip(raw: Iterable[bytes], source: str, summary: ReadSummary) -> Iterator[bytes]:
    """Decompress gzip members as they come, at most :data:`CHUNK` out per step (a small
    file that inflates hugely is read as the rest is: in steps)."""
    d = zlib.decompressobj(31)
    started = False
    for pending in raw:
        while pending:
            started = True
            out = d.decompress(pending, CHUNK)
            if out:
                yield out
            if d.eof:  # a member ended; another may follow
                pending = d.unused_data
                d = zlib.decompressobj(31)
                started = False
            else:
                pending = d.unconsumed_tail
    if started and not d.eof:
        tail = d.flush()
        if tail:
            yield tail
        summary.problems.append(f"{source}: the gzip stream is truncated; read up to there")


def _line_lists(chunks: Iterable[bytes]) -> Iterator[Sequence[str | None]]:
    """Lines (without the newline) of a stream of chunks, decoded as UTF-8 (a bad byte
    becomes U+FFFD), a chunk's worth at a time; None for a line longer than
    :data:`MAX_LINE`, which is dropped as it is read (never held whole). Each chunk is
    decoded and split at once: most of a line's cost is then JSON's."""
    carry = b""
    dropping = False
    for chunk in chunks:
        cut = chunk.rfind(b"\n")
        if cut < 0:
            if not dropping:
                carry += chunk
                if len(carry) > MAX_LINE:
                    carry, dropping = b"", True
            continue
        if dropping:  # the long line ends at this chunk's first newline
            first = chunk.find(b"\n")
            dropping = False
            yield [None]
            body = chunk[first + 1 : cut] if first < cut else None
        else:
            body = carry + chunk[:cut]
        carry = chunk[cut + 1 :]
        if body is not None:
            lines = body.decode("utf-8", "replace").split("\n")
            if len(body) > MAX_LINE:  # only then can one of its lines be too long
                yield [line if len(line) <= MAX_LINE else None for line in lines]
            else:
                yield lines
        if len(carry) > MAX_LINE:
            carry, dropping = b"", True
    if dropping:
        yield [None]
    elif carry:
        yield [carry.decode("utf-8", "replace")]


_scan: Callable[[str, int], tuple[Any, int]] = json.decoder.JSONDecoder().scan_once  # type: ignore[attr-defined]


def parse_stdlib(line: str) -> Any:
    """One JSON value filling the line (json.loads without its layers); ValueError else."""
    try:
        value, end = _scan(line, 0)
    except StopIteration:  # nothing at 0: leading space, or not JSON at all
        return json.loads(line)
    if end != len(line) and line[end:].strip(" \t\r\n"):
        raise ValueError("more after the JSON value")
    return value


def _orjson() -> Callable[[str], Any] | None:
    """orjson's parser when it is installed (4x faster), else None. What orjson refuses and
    the standard library reads (NaN, integers past 64 bits, in fields nobody reads) is read
    by the standard library: a line is a record or not whichever parser is installed, and
    whether msgspec's job path or this one read it."""
    try:
        import orjson  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    loads: Callable[[str], Any] = orjson.loads

    def parse_orjson(line: str) -> Any:
        try:
            return loads(line)
        except ValueError:
            return parse_stdlib(line)

    return parse_orjson


#: The parser: orjson's if installed (``pip install orjson``), else the standard library's.
#: Both raise ValueError (orjson's JSONDecodeError is one) on what is not one JSON value.
parse: Callable[[str], Any] = _orjson() or parse_stdlib


def _msgspec() -> Any:
    """:mod:`memwarden.analysis.fast_job` when msgspec is installed, else None."""
    try:
        from memwarden.analysis import fast_job
    except ImportError:
        return None
    return fast_job


_fast = _msgspec()

#: ``(decode, JobLine, errors, fields)``: msgspec's decoder of a job record's line
#: (``pip install msgspec``: parsed and checked in one step, in C), or None. ``decode``
#: returns a ``JobLine`` where :func:`job_fields` lets the line's record through, and
#: ``fields`` gives its values as :func:`job_fields` would; on any other line it returns
#: another type or raises one of ``errors``. Not used while :data:`parse` is
#: :func:`parse_stdlib`: that is the standard library's path, whole.
fast_jobs: tuple[Callable[[str], Any], type, tuple[type[Exception], ...], Any] | None = (
    (_fast.decode, _fast.JobLine, _fast.ERRORS, _fast.fields) if _fast is not None else None
)


def has_live_keys(r: Any) -> bool:
    """Whether a job record (a dict, or a ``JobLine``) names ``blocks`` or
    ``heap_in_use``, even as null: its live figures were meant to be there."""
    if type(r) is dict:
        return "blocks" in r or "heap_in_use" in r
    return bool(_fast is not None and _fast.has_live_keys(r))


# ----------------------------------------------------------------------------- sources
def _open(path: str, summary: ReadSummary) -> IO[bytes] | None:
    if path == "-":
        stdin = getattr(sys.stdin, "buffer", None)
        if stdin is None or getattr(stdin, "closed", True):
            summary.problems.append("stdin: closed; pipe a journal in, or name a file")
            summary.unreadable.append("stdin")
            return None
        try:
            if os.isatty(stdin.fileno()):
                summary.problems.append("stdin: a terminal; pipe a journal in, or name a file")
                summary.unreadable.append("stdin")
                return None
        except (OSError, ValueError):
            pass  # no fd (a test's stream): read it as it is
        return stdin  # type: ignore[no-any-return]
    try:
        return open(path, "rb")
    except OSError as exc:
        why = exc.strerror or str(exc)
        summary.problems.append(f"{path}: cannot be opened: {why}")
        summary.unreadable.append(path)
        return None


def _name(path: str) -> str:
    return "stdin" if path == "-" else path


def read_source(path: str, summary: ReadSummary) -> Iterator[Record]:
    """The valid records of one source, in file order (a chunk's worth read ahead)."""
    ready: list[Record] = []
    scan = _scan_source(path, summary, ready.append)
    try:
        for _ in scan:
            yield from ready
            ready.clear()
    finally:
        scan.close()


def feed(
    paths: Iterable[str],
    summary: ReadSummary,
    emit: Callable[[Record], None],
    take: Callable[[Record], bool] | None = None,
    take_line: Callable[[tuple[Any, ...], Any], None] | None = None,
) -> None:
    """Hand every valid record of ``paths`` (as :func:`read_journals` orders them) to
    ``emit``, in file order, without a generator step per record. ``take``, when given,
    sees each parsed line first: it returns True when it has taken the record, which must
    then be a job record :func:`check` lets through (``Digest`` checks its job records as
    it reads them: :func:`job_fields`); on False the record is checked and emitted as
    usual. ``take_line``, when given and msgspec is there (:data:`fast_jobs`), takes each
    job record msgspec decodes and checks from its line, before any other parser sees it:
    its values (as :func:`job_fields` gives them) and the ``JobLine``."""
    for path in _ordered(paths, summary):
        for _ in _scan_source(path, summary, emit, take, take_line):
            pass


def _scan_source(
    path: str,
    summary: ReadSummary,
    emit: Callable[[Record], None],
    take: Callable[[Record], bool] | None = None,
    take_line: Callable[[tuple[Any, ...], Any], None] | None = None,
) -> Generator[None, None, None]:
    """Emit the valid records of one source; a step per chunk (see :func:`feed`)."""
    source = _name(path)
    stream = _open(path, summary)
    if stream is None:
        return
    number = records = taken = 0
    events = summary.events
    parse_, check_ = parse, check  # (tests swap ``parse``)
    fast = fast_jobs if take_line is not None and parse_ is not parse_stdlib else None
    decode, job_line, errors, fields = fast if fast is not None else (None, None, (), None)
    try:
        for lines in _line_lists(_chunks(stream, source, summary)):
            for line in lines:
                number += 1
                if line is None:
                    summary.skip(source, number, f"longer than {MAX_LINE} bytes")
                    continue
                try:
                    job = decode(line) if decode is not None else None
                except errors:
                    job = None
                if type(job) is job_line:
                    take_line(fields(job), job)  # type: ignore[misc]
                else:
                    try:
                        record = parse_(line)
                    except (ValueError, RecursionError):
                        _unparsed(summary, source, number, line)
                        continue
                    if take is None or not take(record):
                        why = check_(record)
                        if why is not None:
                            summary.skip(source, number, why)
                            continue
                        records += 1
                        events[record["event"]] += 1
                        emit(record)
                        continue
                if not taken:  # where counting it here would have put "job"
                    events["job"] += 0
                taken += 1
            yield
    finally:
        summary.count(number, records, taken)
        _close(path, stream)


def _close(path: str, stream: IO[bytes]) -> None:
    """Done with a source: its file closed (stdin stays open)."""
    if path != "-":
        stream.close()


def _unparsed(summary: ReadSummary, source: str, number: int, line: str) -> None:
    """A line no parser reads: skipped, and said unless blank."""
    if line.strip():
        what = "truncated or not JSON" if line.lstrip()[:1] == "{" else "not JSON"
        summary.skip(source, number, what)


def _first_ts(path: str) -> float:
    """When a file's first valid record was written (inf when none in its first lines)."""
    probe = ReadSummary()
    records = read_source(path, probe)
    try:
        for record, _ in zip(records, range(50), strict=False):
            return float(record["ts"])
    finally:
        records.close()  # type: ignore[attr-defined]
    return float("inf")


def read_journals(paths: Iterable[str], summary: ReadSummary | None = None) -> Iterator[Record]:
    """The valid records of every source (``-``: stdin), oldest file first; what was met
    on the way goes into ``summary``."""
    summary = summary if summary is not None else ReadSummary()
    for path in _ordered(paths, summary):
        yield from read_source(path, summary)


def _ordered(paths: Iterable[str], summary: ReadSummary) -> list[str]:
    """The sources, oldest file first; their names go into ``summary``."""
    paths = list(paths)
    summary.sources = [_name(p) for p in paths]
    if len(paths) > 1 and "-" not in paths:
        paths.sort(key=_first_ts)
    return paths
