"""Job record lines decoded and checked by msgspec, in C: the fast path of ``diagnose``.

Importing this module needs msgspec (``pip install memwarden[fast]``);
:data:`memwarden.analysis.read.fast_jobs` uses it when it is there. :func:`decode` takes a
line and returns a :class:`JobLine` only where :func:`memwarden.analysis.read.job_fields`
would let the line's record through, with the same values (:func:`fields`); on any other
line (another event, a field of the wrong type or out of range, not JSON, a key repeated
in a way that could change the answer) it raises one of :data:`ERRORS`, and the line goes
the usual way (orjson or the standard library's json, then :func:`check`).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

#: A byte count (:func:`memwarden.analysis.read._size`): an int or a float, 0 <= v < 2**53.
Size = Annotated[int, Meta(ge=0, lt=2**53)] | Annotated[float, Meta(ge=0, lt=2.0**53)]
#: ``rss_after``: a size above 0.
Level = Annotated[int, Meta(gt=0, lt=2**53)] | Annotated[float, Meta(gt=0, lt=2.0**53)]
#: ``ts``: epoch seconds, 0 <= ts < 1e11 (``MAX_TS``).
Time = Annotated[int, Meta(ge=0, lt=10**11)] | Annotated[float, Meta(ge=0, lt=1e11)]
Pid = int | str | None


class JobLine(Struct, tag_field="event", tag="job", kw_only=True):
    """A job record, its fields in the order of :data:`memwarden.analysis.read.JOB_FIELDS`."""

    job: Annotated[str, Meta(min_length=1, max_length=500)]
    pid: Pid = None
    worker_pid: Pid = None
    host: str | None = None
    hostname: str | None = None
    dyno: str | None = None
    ts: Time
    rss_after: Level
    rss_before: Size | None = None
    duration_s: Size | None = None
    #: UNSET when the key is absent (``has_live_keys``: present, even null, counts)
    blocks: Size | UnsetType | None = UNSET
    heap_in_use: Size | UnsetType | None = UNSET
    mmapped: Size | None = None
    allocated: Size | None = None
    peak_rss: Size | None = None
    blocks_before: Size | None = None
    heap_in_use_before: Size | None = None
    mmapped_before: Size | None = None
    allocated_before: Size | None = None


class _NoJob(Struct, tag_field="event", tag="\x00"):
    """Never a journal's event: beside :class:`JobLine` in a union, it makes msgspec
    require the ``event`` key (a lone tagged struct would take a record without one)."""


_decoder = msgspec.json.Decoder(JobLine | _NoJob)
decode = _decoder.decode
ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError,)  # ValidationError is one
_astuple = msgspec.structs.astuple


def fields(job: JobLine) -> tuple[Any, ...]:
    """``job``'s values in the order of ``JOB_FIELDS``, None where missing."""
    values = _astuple(job)
    if job.blocks is UNSET or job.heap_in_use is UNSET:
        values = tuple(None if v is UNSET else v for v in values)
    return values


def has_live_keys(job: JobLine) -> bool:
    return job.blocks is not UNSET or job.heap_in_use is not UNSET
