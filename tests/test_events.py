"""Causes travel as values: journal records carry ``cause``, and diagnose and metrics read
it; the prose is read only for journals written before the field existed."""

from __future__ import annotations

import json

import pytest

from memwarden.analysis.diagnose import diagnose
from memwarden.events import (
    Cause,
    State,
    cause_field,
    cause_of,
    cause_words,
    metric_label,
    state_of,
)
from memwarden.fleet import heartbeat_of

MB = 1 << 20
GROWTH_PROSE = "230 MiB over soft limit 217 MiB, rising: hard limit in 0.3s, before grace ends"


def test_a_record_with_a_cause_is_read_by_its_cause_not_its_prose():
    # prose that says "hard limit" and "soft limit": the cause decides
    record = {"event": "restart", "reason": "over hard limit, soft limit", "cause": "growth"}
    assert cause_of(record) is Cause.GROWTH
    assert cause_of({"event": "kill", "reason": "anything", "cause": "no_such_cause"}) is None
    assert cause_field(Cause.CAPPED) == {"cause": "restart_cap"} and cause_field(None) == {}


@pytest.mark.parametrize(
    ("event", "reason", "cause"),
    [
        ("kill", "243.8 MiB over hard limit 243.2 MiB", Cause.OVER_HARD),
        ("kill", "945 MiB rising 400 MiB/s: over hard limit 950 MiB within 0.02s", Cause.OVER_HARD),
        ("kill", "still running 30s after SIGTERM", Cause.SHUTDOWN_OVERRUN),
        ("restart", GROWTH_PROSE, Cause.GROWTH),
        (
            "restart",
            "219.6 MiB over soft limit 217.6 MiB with no job in hand",
            Cause.NO_JOB_IN_HAND,
        ),
        ("restart", "300 MiB over soft limit 290 MiB for 2m00s", Cause.GRACE_OVER),
        ("reclaim", "220.7 MiB over soft limit 217.6 MiB", Cause.OVER_SOFT),
        ("reclaim", "asked by the worker: over its soft limit", Cause.OVER_SOFT),
        ("restart", "memory pressure: full 55% for 41.5s", Cause.PRESSURE),
        ("restart", "drained 12s ago, memory no longer rising", Cause.DRAINED),
        ("kill", "second SIGINT: killing at once", None),
        ("restart", None, None),
    ],
)
def test_an_old_record_without_a_cause_is_read_from_its_prose(event, reason, cause):
    assert cause_of({"event": event, "reason": reason}) is cause


def test_metric_labels_stay_those_dashboards_select_on():
    labels = {c: metric_label(c) for c in Cause}
    assert {v for v in labels.values()} == {
        "hard_limit",
        "soft_limit",
        "shutdown_timeout",
        "other",
    }
    assert labels[Cause.OVER_HARD] == labels[Cause.PROJECTED_HARD] == "hard_limit"
    assert labels[Cause.SHUTDOWN_OVERRUN] == "shutdown_timeout"
    for soft in (Cause.OVER_SOFT, Cause.GRACE_OVER, Cause.NO_JOB_IN_HAND, Cause.ASKED):
        assert labels[soft] == "soft_limit"
    assert labels[Cause.PRESSURE] == "other" and metric_label(None) == "other"


def test_a_recycle_is_a_pool_child_over_its_share_unless_a_hard_limit_did_it():
    assert cause_words(Cause.OVER_SOFT, "recycle") == "pool child over its share"
    assert cause_words(Cause.PRESSURE, "recycle") == "pool child over its share"
    assert cause_words(Cause.OVER_HARD, "kill") == "hard limit"
    assert cause_words(None, "signal") == "other"


def journal(restarts: list[dict]) -> list[dict]:
    records, ts = [], 1_700_000_000.0
    for i in range(40):
        ts += 1
        before = 100 * MB + i * MB
        records.append(
            {
                "event": "job",
                "ts": ts,
                "pid": 7,
                "job": "a",
                "job_id": str(i),
                "rss_before": before,
                "rss_after": before + MB,
                "duration_s": 0.1,
            }
        )
    for r in restarts:
        ts += 1
        records.append({"ts": ts, "pid": 7, "total": 150 * MB, "limit": 140 * MB, **r})
    return records


def test_diagnose_groups_by_the_cause_and_reads_old_journals_alike():
    """A new record's cause and an old record's prose fall in the same group."""
    new = {"event": "restart", "reason": GROWTH_PROSE, "cause": "growth", "action": "signal"}
    old = {"event": "restart", "reason": GROWTH_PROSE, "action": "signal"}
    groups = diagnose(journal([new, old]))["evidence"]["restart_reasons"]
    assert [(g["cause"], g["action"], g["count"]) for g in groups] == [
        ("soft limit, rising to the hard limit", "restart (signal)", 2)
    ]


def test_diagnose_follows_the_cause_where_the_prose_would_mislead():
    """Prose is for people: a record's cause wins over any words in its reason."""
    record = {
        "event": "kill",
        "reason": "1 GiB over soft limit, still running",
        "cause": "over_hard_limit",
    }
    groups = diagnose(journal([record]))["evidence"]["restart_reasons"]
    assert [(g["cause"], g["action"]) for g in groups] == [("hard limit", "kill")]


def test_a_heartbeat_of_an_older_warden_says_its_state_in_todays_words():
    """A fleet mid-upgrade: wardens before one vocabulary said "over soft", "killing"."""
    old = {"fleet": "f", "host": "h", "pid": 1, "state": "over soft"}
    assert heartbeat_of(json.dumps(old))["state"] == State.OVER_SOFT.value
    assert heartbeat_of(json.dumps({**old, "state": "killing"}))["state"] == "killed"
    assert heartbeat_of(json.dumps({**old, "state": "over hard"}))["state"] == "over_hard_limit"
    for state in State:
        assert heartbeat_of(json.dumps({**old, "state": state.value}))["state"] == state.value
    assert state_of("something new") == "something new"
