"""The journal's records, typed: one ``TypedDict`` per :class:`~memwarden.events.Event`,
each field's type and meaning in its annotation (``Annotated[type, "meaning"]``).

:data:`RECORDS` maps an event to its record; :func:`problems` checks a record read back
from a journal against it (tests do, on journals real code wrote: the writer stays a
plain ``write(event, **fields)`` on the hot path); :func:`journal_markdown` is the
records section of ``docs/journal.md`` (``make readme``).

Kept apart from :mod:`memwarden.events` (the vocabulary: causes, states, event names),
which the warden imports on every start: this is the schema, read by tests and docs.
(No ``from __future__ import annotations`` here: ``TypedDict`` reads ``NotRequired`` from
live annotations.)
"""

import functools
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, NotRequired, Required, TypedDict, Union

from memwarden.events import Event

# ----------------------------------------------------------------- shared fields
Bytes = Annotated[int, "bytes"]
JobId = Annotated[str | int | None, "the job's id (null when the job has none)"]
Job = Annotated[str, "the job's kind: its task, function or actor name"]
Total = Annotated[int, "the gauge's reading (bytes): what the ladder judges"]
SoftLimit = Annotated[int | None, "the soft limit (bytes; null: none set)"]
Limit = Annotated[int | None, "the limit the decision judged against (bytes; null: none)"]
Reason = Annotated[str, "why, in a sentence for people (its wording may change)"]
CauseField = Annotated[str, "why, as a fixed word for programs (see Causes below)"]
Gauge = Annotated[str, "the gauge that measured (`cgroup`, `tree`, `process`, ...)"]
Framework = Annotated[str, "the integration that wrote it (`celery`, `rq`, `run`, ...)"]
Supervisor = Annotated[int, "`memwarden run`'s pid (then `pid` is the command's)"]
Uptime = Annotated[float, "seconds since the command started"]
DryRun = Annotated[bool, "true: `MEMWARDEN_DRY_RUN`, only said, not done"]
Kills = Annotated[int, "hard kills the job was running at so far (its poison count)"]
Queue = Annotated[str | None, "the queue it came from"]
Cmd = Annotated[list[str], "the command, secrets redacted"]


class InFlight(TypedDict):
    """A job in hand at that moment."""

    job: Job
    job_id: JobId
    queue: NotRequired[Queue]
    thread: NotRequired[Annotated[str, "the worker thread running it (Dramatiq)"]]


InFlights = Annotated[list[InFlight], "the jobs in hand then: `job`, `job_id`"]


class Psi(TypedDict):
    """Memory pressure (PSI), percent of time stalled."""

    some10: float
    some60: float
    full10: float
    full60: float
    src: Annotated[str, "where it was read (`cgroup`, `system`)"]


class TraceLine(TypedDict):
    """A line of code whose allocations grew over the traced runs."""

    where: Annotated[str, "file:line"]
    bytes: Bytes
    count: Annotated[int, "allocations"]
    code: Annotated[str, "the line's source"]


# ----------------------------------------------------------------- records
class Record(TypedDict):
    """Every record has these."""

    event: Annotated[str, "what happened: one of the events here"]
    ts: Annotated[float, "when (epoch seconds)"]
    pid: Annotated[int, "the process it is about"]


class JobRecord(Record):
    """A job ended (one per job; `memwarden diagnose` reads these)."""

    job: Job
    job_id: JobId
    rss_before: Annotated[int, "the job's process's RSS at its start (bytes)"]
    rss_after: Annotated[int, "the same at its end (bytes)"]
    duration_s: Annotated[float, "how long it ran (seconds)"]
    framework: NotRequired[Framework]
    queue: NotRequired[Queue]
    ok: NotRequired[Annotated[bool, "false: it failed (RQ)"]]
    error: NotRequired[Annotated[str, "the exception it raised (Huey)"]]
    interrupted: NotRequired[Annotated[bool, "cut short by a kill (Huey)"]]
    job_try: NotRequired[Annotated[int | None, "arq's try number"]]
    concurrent: NotRequired[Annotated[int, "jobs running beside it, itself included (arq)"]]
    peak_rss: NotRequired[Annotated[int, "the work horse's peak RSS (bytes, RQ)"]]
    exit_status: NotRequired[Annotated[int, "the work horse's wait status (RQ)"]]
    worker_pid: NotRequired[Annotated[int, "the worker whose horse ran it (RQ)"]]
    blocks: NotRequired[Annotated[int, "Python's allocated blocks at its end (live memory)"]]
    heap_in_use: NotRequired[Annotated[int, "glibc heap bytes in use at its end"]]
    mmapped: NotRequired[Annotated[int, "glibc mmapped bytes at its end"]]
    allocated: NotRequired[Annotated[int, "jemalloc's allocated bytes at its end"]]
    blocks_before: NotRequired[Annotated[int, "`blocks` at its start"]]
    heap_in_use_before: NotRequired[Annotated[int, "`heap_in_use` at its start"]]
    mmapped_before: NotRequired[Annotated[int, "`mmapped` at its start"]]
    allocated_before: NotRequired[Annotated[int, "`allocated` at its start"]]


class SampleRecord(Record):
    """A reading (not every one: a few a minute when quiet, each when the ladder acts)."""

    total: Total
    limit: SoftLimit
    hard: Annotated[int | None, "the hard limit (bytes; null: none)"]
    gauge: Gauge
    rss: NotRequired[Annotated[int, "the process's own RSS (bytes)"]]
    psi: NotRequired[Annotated[Psi, "memory pressure: `some10` ... `full60`, `src`"]]
    events: NotRequired[Annotated[dict[str, int], "the cgroup's `memory.events` counts"]]
    supervisor: NotRequired[Supervisor]


class ReclaimRecord(Record):
    """Memory handed back to the OS (garbage collection, `malloc_trim`)."""

    reason: Reason
    freed: Annotated[int, "bytes the RSS fell by"]
    rss_after: Annotated[int, "RSS after (bytes)"]
    cause: NotRequired[CauseField]
    rss_before: NotRequired[Annotated[int, "RSS before (bytes)"]]
    total_before: NotRequired[Annotated[int, "the gauge before (bytes)"]]
    total_after: NotRequired[Annotated[int, "the gauge after (bytes)"]]
    trimmed: NotRequired[Annotated[bool, "`malloc_trim` gave memory back"]]
    seconds: NotRequired[Annotated[float, "how long it took"]]
    children_asked: NotRequired[Annotated[int, "pool children asked to reclaim too"]]
    total: NotRequired[Total]
    limit: NotRequired[Limit]
    gauge: NotRequired[Gauge]
    in_flight: NotRequired[InFlights]
    dry_run: NotRequired[DryRun]


class PauseRecord(Record):
    """Intake stopped over the soft limit (the jobs in hand go on)."""

    total: Total
    limit: SoftLimit


class ResumeRecord(Record):
    """Intake taken up again."""

    total: Total
    limit: SoftLimit


class RestartRecord(Record):
    """A graceful restart (or `recycle`: one pool child replaced)."""

    reason: Reason
    total: Total
    limit: Limit
    gauge: Gauge
    in_flight: InFlights
    action: Annotated[str, "how: `recycle`, `signal`, `exit`, `heroku`, `kubernetes`, ..."]
    cause: NotRequired[CauseField]
    dry_run: NotRequired[DryRun]
    supervisor: NotRequired[Supervisor]
    signal: NotRequired[Annotated[str | int, "the stop signal sent (`memwarden run`)"]]
    uptime_s: NotRequired[Uptime]
    child_pid: NotRequired[Annotated[int, "the worker recycled (Gunicorn)"]]
    uss: NotRequired[Annotated[int, "that worker's own memory (bytes, Gunicorn)"]]


class RestartCalledOffRecord(Record):
    """A restart called off: well under the soft limit once the jobs in hand were done."""

    total: Total
    limit: Annotated[int, "the soft limit (bytes)"]


class KillRecord(Record):
    """A hard kill (SIGKILL): the worker, or only the pool child or work horse in `target`."""

    reason: Reason
    in_flight: InFlights
    total: Annotated[int | None, "the gauge's reading (bytes; null: none yet)"]
    limit: Limit
    cause: NotRequired[CauseField]
    gauge: NotRequired[Gauge]
    dry_run: NotRequired[DryRun]
    target: NotRequired[Annotated[Literal["child", "horse"], "only this one died"]]
    child_pid: NotRequired[Annotated[int, "the pool child's or horse's pid"]]
    uss: NotRequired[Annotated[int, "the pool child's own memory (bytes, Celery)"]]
    given_back: NotRequired[Annotated[int, "messages given back to the broker first"]]
    supervisor: NotRequired[Supervisor]
    action: NotRequired[Annotated[Literal["kill"], "`memwarden run`'s word for it"]]
    signal: NotRequired[Annotated[str | int, "`SIGKILL` (`memwarden run`)"]]
    uptime_s: NotRequired[Uptime]


class OomKillRecord(Record):
    """The kernel's OOM killer killed in our cgroup: the ladder acted too late."""

    kills: Annotated[int, "OOM kills since the last look"]
    oom_kills: Annotated[int, "the cgroup's OOM kill count"]
    cgroup: Annotated[str, "the cgroup's path"]
    limit: Annotated[int | None, "the quota (bytes)"]
    before_start: NotRequired[Annotated[bool, "they came before this worker started"]]
    supervisor: NotRequired[Supervisor]
    victim: NotRequired[Annotated[str, "`command`, or `a process of the command`"]]
    total: NotRequired[Annotated[int | None, "the last reading (bytes)"]]
    uptime_s: NotRequired[Uptime]


class TraceRecord(Record):
    """`MEMWARDEN_TRACE`: where a job kind's allocations grew over its traced runs."""

    job: Job
    runs: Annotated[int, "runs traced"]
    top: Annotated[list[TraceLine], "the lines that grew most: `where`, `bytes`, `count`, `code`"]
    overhead_s: Annotated[float, "the tracing's cost (seconds)"]


class PutBackRecord(Record):
    """A job taken and not started (intake paused, a kill first): back on its queue."""

    job: Job
    job_id: JobId
    framework: Framework
    queue: NotRequired[Queue]


class RequeueRecord(Record):
    """A job cut by a kill, one kill counted: run again."""

    job: Job
    job_id: JobId
    kills: Kills
    by: Annotated[str, "what found it: `watchdog`, `parent`, `rescue` or `oom_kill`"]
    framework: Framework
    queue: NotRequired[Queue]


class QuarantineRecord(Record):
    """A poison job (running at `MEMWARDEN_POISON_KILLS` kills) set aside, not run again."""

    job: Job
    job_id: JobId
    kills: Kills
    framework: NotRequired[Framework]
    queue: NotRequired[Queue]
    reason: NotRequired[Reason]
    where: NotRequired[Annotated[str, "where it was put (a Redis list, a dead-letter queue)"]]


class SkipRecord(Record):
    """`memwarden run`: the command skipped a quarantined job given to it again."""

    job: Job
    job_id: JobId


class StartRecord(Record):
    """`memwarden run` started the command (`pid`)."""

    supervisor: Supervisor
    cmd: Cmd


class DrainRecord(Record):
    """`memwarden run`: the drain signal, at the soft crossing: the command takes no work."""

    supervisor: Supervisor
    signal: Annotated[str, "the drain signal"]
    reason: Reason
    total: Total
    limit: Limit
    uptime_s: Uptime
    cause: NotRequired[CauseField]
    dry_run: NotRequired[DryRun]


class ExitRecord(Record):
    """`memwarden run`: the command ended."""

    supervisor: Supervisor
    status: Annotated[int, "its exit status"]
    how: Annotated[str, "how it ended: `exited with status 3`, `killed by SIGKILL`"]
    why: Annotated[str, "why: `restart`, `kill`, `oom_kill`, `stopped`, `hung up`, `exited`"]
    uptime_s: Uptime


class GiveUpRecord(Record):
    """`memwarden run`: the command died young too often: run gives up."""

    reason: Reason
    cause: CauseField
    status: Annotated[int, "run's exit status"]
    cmd: Cmd


class BrakeRecord(Record):
    """`memwarden run`: `memory.high` set on the command's cgroup (the kernel slows it)."""

    supervisor: Supervisor
    cgroup: Annotated[str, "the command's cgroup"]
    high: Annotated[int, "`memory.high` (bytes)"]


#: Every event and its record.
RECORDS: dict[Event, type] = {
    Event.JOB: JobRecord,
    Event.SAMPLE: SampleRecord,
    Event.RECLAIM: ReclaimRecord,
    Event.PAUSE: PauseRecord,
    Event.RESUME: ResumeRecord,
    Event.RESTART: RestartRecord,
    Event.RESTART_CALLED_OFF: RestartCalledOffRecord,
    Event.KILL: KillRecord,
    Event.OOM_KILL: OomKillRecord,
    Event.TRACE: TraceRecord,
    Event.PUT_BACK: PutBackRecord,
    Event.REQUEUE: RequeueRecord,
    Event.QUARANTINE: QuarantineRecord,
    Event.SKIP: SkipRecord,
    Event.START: StartRecord,
    Event.DRAIN: DrainRecord,
    Event.EXIT: ExitRecord,
    Event.GIVE_UP: GiveUpRecord,
    Event.BRAKE: BrakeRecord,
}


class Field(typing.NamedTuple):
    """One field of a record: its name, type, meaning and whether every record has it."""

    name: str
    type: Any
    doc: str
    required: bool


@functools.cache
def fields(record: type) -> tuple[Field, ...]:
    """``record``'s fields, in the order they are declared (:class:`Record`'s first)."""
    hints = typing.get_type_hints(record, include_extras=True)
    optional = {n for n, tp in hints.items() if typing.get_origin(tp) is NotRequired}
    return tuple(
        Field(name, _bare(tp), _doc(_unwrapped(tp)), name not in optional)
        for name, tp in hints.items()
    )


def _unwrapped(tp: Any) -> Any:
    """``tp`` without ``NotRequired``/``Required``."""
    while typing.get_origin(tp) in (NotRequired, Required):
        tp = typing.get_args(tp)[0]
    return tp


def _bare(tp: Any) -> Any:
    """``tp`` without its qualifiers and meaning."""
    tp = _unwrapped(tp)
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _doc(tp: Any) -> str:
    if typing.get_origin(tp) is Annotated:
        return " ".join(str(m) for m in tp.__metadata__)
    return ""


def problems(record: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``record`` against :data:`RECORDS`: an unknown event, a missing
    or unknown field, a value of the wrong type (empty: it conforms)."""
    try:
        event = Event(record.get("event"))
    except ValueError:
        return [f"unknown event {record.get('event')!r}"]
    return [f"{event.value}: {p}" for p in _problems(record, RECORDS[event])]


def _problems(value: Mapping[str, Any], record: type) -> list[str]:
    known = {f.name: f for f in fields(record)}
    out = [f"no {name}" for name, f in known.items() if f.required and name not in value]
    for name, v in value.items():
        f = known.get(name)
        if f is None:
            out.append(f"unknown field {name}")
        elif not _conforms(v, f.type):
            out.append(f"{name}={v!r} is not {type_name(f.type)}")
    return out


def _conforms(value: Any, tp: Any) -> bool:
    tp = _bare(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is None or tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(v, args[1]) for v in value.values())
    if typing.is_typeddict(tp):
        return isinstance(value, dict) and not _problems(value, tp)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def type_name(tp: Any) -> str:
    """A field's type in JSON words: `int`, `float`, `str`, `bool`, `null`, `list of ...`."""
    tp = _bare(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is None or tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return " or ".join(f'"{a}"' for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"object of {type_name(args[1])}"
    if typing.is_typeddict(tp):
        return "object"
    return str(getattr(tp, "__name__", tp))


def journal_markdown() -> str:
    """The records section of ``docs/journal.md``: one table per event."""
    out = [_table("Every record", Record, common=False)]
    for event, record in RECORDS.items():
        out.append(_table(f"`{event.value}`", record, common=True))
    return "\n\n".join(out)


def _table(title: str, record: type, common: bool) -> str:
    doc = (record.__doc__ or "").strip()
    lines = [f"### {title}", "", doc, "", "| field | type | meaning |", "|---|---|---|"]
    base = {f.name for f in fields(Record)}
    for f in fields(record):
        if common and f.name in base:
            continue
        name = f"`{f.name}`" if f.required else f"`{f.name}` (optional)"
        lines.append(f"| {name} | {type_name(f.type)} | {f.doc.replace('|', '/')} |")
    return "\n".join(lines)
