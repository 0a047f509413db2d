"""One vocabulary for why the warden acts and what state it is in, for logs, journal,
metrics and ``memwarden status``.

A :class:`Cause` travels on every :class:`memwarden.policy.Decision` and, as its value, in
the ``cause`` field of the journal's ``reclaim``, ``restart``, ``kill``, ``drain`` and
``give_up`` records (``reason`` stays prose, for people). Code branches on the cause, never
on the prose: :func:`cause_of` reads a record's ``cause``, and parses the prose only for
journals written before the field existed.

A :class:`State` is what metrics (``memwarden_state``) and fleet heartbeats say a warden is
doing; the names are the metric's labels, which dashboards select on.

An :class:`Event` is a journal record's ``event``; :mod:`memwarden.records` gives each its
fields. :func:`event_of` reads a record's event, old names included.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any


class Cause(str, Enum):
    """Why a decision was taken (its value is the journal's ``cause`` field)."""

    #: Under the soft limit (and no pressure held): nothing to do.
    UNDER_SOFT = "under_soft_limit"
    #: The start reading is under the soft limit.
    STARTS_UNDER = "starts_under_soft_limit"
    #: The process started over its soft limit: soft restarts are off for its lifetime.
    STARTS_ABOVE = "starts_above_soft_limit"
    #: Over the soft limit: the soft rungs (reclaim, recycle a pool child).
    OVER_SOFT = "over_soft_limit"
    #: At or over the hard limit: reclaim once, then kill.
    OVER_HARD = "over_hard_limit"
    #: A sustained rise reaches the hard limit within the lookahead: kill now.
    PROJECTED_HARD = "projected_hard_limit"
    #: Over the soft limit and rising: the hard limit comes before the grace and a drain
    #: are over: restart now.
    GROWTH = "growth"
    #: Over the soft limit for the whole grace: restart.
    GRACE_OVER = "grace_over"
    #: Over the soft limit, the grace still running: wait.
    GRACE = "grace"
    #: Over the soft limit (or, intake paused, just under it) with no job in hand: restart
    #: now (its drain is instant).
    NO_JOB_IN_HAND = "no_job_in_hand"
    #: Just under the soft limit after a crossing (a shallow, short dip): intake stays
    #: paused until the jobs in hand are done.
    JUST_UNDER = "just_under_soft_limit"
    #: Full memory pressure (PSI) held for the hold time, under the soft limit.
    PRESSURE = "memory_pressure"
    #: Under pressure, a reclaim has not yet had the time to show in PSI.
    PRESSURE_SETTLING = "pressure_settling"
    #: A reclaim asked of other processes (pool children) may still show: wait.
    RECLAIM_SETTLING = "reclaim_settling"
    #: The restart cap in the window is reached: wait (and say so).
    CAPPED = "restart_cap"
    #: The minimum uptime (with its back-off) is not reached yet: wait.
    UPTIME = "min_uptime"
    #: A restart is already under way: wait.
    RESTART_UNDER_WAY = "restart_under_way"
    #: A kill is already under way: wait.
    KILL_UNDER_WAY = "kill_under_way"
    #: Another process holds the restart (an RQ work horse ends with its job): wait.
    HELD_ELSEWHERE = "held_elsewhere"
    #: Still running the shutdown timeout after a graceful restart or stop: kill.
    SHUTDOWN_OVERRUN = "shutdown_overrun"
    #: ``memwarden run``: a second SIGINT: kill at once.
    INTERRUPTED = "second_interrupt"
    #: A pool child asked by its worker to reclaim.
    ASKED = "asked_by_worker"
    #: ``memwarden run``: drained CMD takes no work again: restart it.
    DRAINED = "drained"
    #: ``memwarden run``: CMD died young too often: giving up.
    EARLY_EXITS = "early_exits"


class State(str, Enum):
    """What a warden is doing (the ``state`` label of ``memwarden_state``, the ``state`` of
    a fleet heartbeat)."""

    OK = "ok"
    #: Under the soft limit, intake still paused: a reclaim won memory back only just
    #: under it, or memory pressure runs the ladder.
    PAUSED = "paused"
    OVER_SOFT = "over_soft_limit"
    OVER_HARD = "over_hard_limit"
    RESTARTING = "restarting"
    KILLED = "killed"
    OFF = "off"


class Event(str, Enum):
    """A journal record's ``event`` (its fields: :data:`memwarden.records.RECORDS`)."""

    JOB = "job"
    SAMPLE = "sample"
    RECLAIM = "reclaim"
    PAUSE = "pause"
    RESUME = "resume"
    RESTART = "restart"
    RESTART_CALLED_OFF = "restart_called_off"
    KILL = "kill"
    OOM_KILL = "oom_kill"
    TRACE = "trace"
    PUT_BACK = "put_back"
    REQUEUE = "requeue"
    QUARANTINE = "quarantine"
    SKIP = "skip"
    START = "start"
    DRAIN = "drain"
    EXIT = "exit"
    GIVE_UP = "give_up"
    BRAKE = "brake"


#: Words heartbeats of wardens before one vocabulary used (a fleet mid-upgrade).
_OLD_STATES = {"over soft": State.OVER_SOFT, "over hard": State.OVER_HARD, "killing": State.KILLED}


def state_of(text: str) -> str:
    """A heartbeat's ``state`` in today's words (an unknown one as it is)."""
    old = _OLD_STATES.get(text)
    return text if old is None else old.value


#: Names old journals used: RQ, Dramatiq and ``memwarden run`` wrote ``poison`` for a
#: quarantine (``memwarden run`` then wrote ``quarantine`` for a skip, with no ``kills``).
_OLD_EVENTS = {"poison": Event.QUARANTINE}


def event_of(record: Mapping[str, Any]) -> str:
    """A record's event in today's words, whatever version wrote it (an unknown event
    as it is)."""
    event = str(record.get("event"))
    if event == "quarantine" and "kills" not in record:
        return Event.SKIP.value
    old = _OLD_EVENTS.get(event)
    return event if old is None else old.value


#: Metric ``reason`` labels (``memwarden_reclaims_total``, ``_restarts_total``,
#: ``_kills_total``): kept as they were when they came from the prose.
_LABELS = {
    Cause.OVER_HARD: "hard_limit",
    Cause.PROJECTED_HARD: "hard_limit",
    Cause.SHUTDOWN_OVERRUN: "shutdown_timeout",
    Cause.OVER_SOFT: "soft_limit",
    Cause.GROWTH: "soft_limit",
    Cause.GRACE_OVER: "soft_limit",
    Cause.NO_JOB_IN_HAND: "soft_limit",
    Cause.ASKED: "soft_limit",
    Cause.DRAINED: "soft_limit",
}

#: Words for the restart/kill groups of ``memwarden diagnose`` and its report.
_WORDS = {
    Cause.OVER_HARD: "hard limit",
    Cause.PROJECTED_HARD: "hard limit",
    Cause.SHUTDOWN_OVERRUN: "shutdown timeout",
    Cause.NO_JOB_IN_HAND: "soft limit, idle",
    Cause.GROWTH: "soft limit, rising to the hard limit",
    Cause.GRACE_OVER: "soft limit, grace over",
    Cause.OVER_SOFT: "soft limit, grace over",
    Cause.DRAINED: "soft limit, drained",
    Cause.PRESSURE: "memory pressure",
}


def cause_field(cause: Cause | None) -> dict[str, str]:
    """The ``cause`` field of a journal record (nothing when the cause is not known)."""
    return {} if cause is None else {"cause": cause.value}


def metric_label(cause: Cause | None) -> str:
    """The metric ``reason`` label of a cause (``hard_limit``, ``soft_limit`` …)."""
    return "other" if cause is None else _LABELS.get(cause, "other")


def cause_words(cause: Cause | None, action: str | None = None) -> str:
    """Why a restart, recycle or kill happened, in a few words."""
    hard = cause in (Cause.OVER_HARD, Cause.PROJECTED_HARD, Cause.SHUTDOWN_OVERRUN)
    if action == "recycle" and not hard:
        return "pool child over its share"
    return "other" if cause is None else _WORDS.get(cause, "other")


def cause_of(record: Mapping[str, Any]) -> Cause | None:
    """A journal record's cause: its ``cause`` field; for a record written before that
    field existed, read from its ``reason`` prose (None: not known)."""
    value = record.get("cause")
    if value is not None:
        try:
            return Cause(value)
        except ValueError:
            return None
    return _legacy_cause(record)


def _legacy_cause(record: Mapping[str, Any]) -> Cause | None:
    """The cause of an old record (no ``cause`` field), from the prose the warden wrote
    then. The only place that reads prose: keep it for old journals, never extend it."""
    text = str(record.get("reason") or "").lower()
    if "still running" in text:
        return Cause.SHUTDOWN_OVERRUN
    if "before grace ends" in text:
        return Cause.GROWTH
    if "hard limit" in text:
        return Cause.OVER_HARD
    if "soft limit" in text:
        if "no job in hand" in text:
            return Cause.NO_JOB_IN_HAND
        return Cause.GRACE_OVER if record.get("event") == "restart" else Cause.OVER_SOFT
    if "memory pressure" in text:
        return Cause.PRESSURE
    if text.startswith("drained "):
        return Cause.DRAINED
    return None


def action_word(event: str, action: str, dry_run: bool = False) -> str:
    """The word for what was done, the same in logs, journal and report: ``reclaim``,
    ``recycle``, ``restart (signal)``, ``kill``."""
    if event in ("kill", "reclaim"):
        word = event
    elif action == "recycle":
        word = "recycle"
    else:
        word = f"restart ({action})" if action and action != "restart" else "restart"
    return word + (" (dry run)" if dry_run else "")
