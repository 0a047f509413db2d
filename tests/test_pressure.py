"""Pressure (PSI) and memory events: v2 file formats from fixtures, the real ones here.

This machine's memory controller is cgroup v1: its one event count (``oom_kill``) is read
from a real cgroup whose child the kernel really OOM-kills, and PSI
from the real ``/proc/pressure/memory``. The v2 files (``memory.pressure``,
``memory.events``) are parsed from fixture copies of a real kernel's; the cgroup v2 VM
tests read them for real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cgroups import memory_cgroup
from conftest import IN_CI, wait_for
from memwarden import Warden
from memwarden.gauges.cgroup import Cgroup
from memwarden.gauges.pressure import (
    SYSTEM_PRESSURE,
    Signals,
    parse_events,
    parse_pressure,
)
from memwarden.policy import Action

MB = 1024 * 1024
#: A v2 cgroup's files as the kernel writes them (6.1, a cgroup under memory.high).
V2_PRESSURE = (
    "some avg10=12.34 avg60=5.67 avg300=1.20 total=4830211\n"
    "full avg10=8.00 avg60=3.25 avg300=0.71 total=2911034\n"
)
V2_EVENTS = "low 0\nhigh 1742\nmax 35\noom 2\noom_kill 1\noom_group_kill 0\n"


def test_psi_lines_are_parsed():
    p = parse_pressure(V2_PRESSURE, "cgroup", "/x/memory.pressure")
    assert p.some == (12.34, 5.67, 1.20) and p.some_total == 4830211
    assert p.full == (8.00, 3.25, 0.71) and p.full_total == 2911034
    assert p.brief() == {"some10": 12.34, "some60": 5.67, "full10": 8.0, "full60": 3.25}
    assert p.describe() == ("some 12.34/5.67/1.20 full 8.00/3.25/0.71 % (avg10/60/300, cgroup)")


def test_a_missing_full_line_is_no_full_pressure_and_garbage_is_refused():
    p = parse_pressure("some avg10=1.00 avg60=0.50 avg300=0.10 total=99\n")
    assert p.full == (0.0, 0.0, 0.0) and p.full_total == 0
    with pytest.raises(ValueError):
        parse_pressure("some avg10=x avg60=0 avg300=0 total=1\n")
    with pytest.raises(ValueError):
        parse_pressure("")


def test_memory_events_are_parsed():
    assert parse_events(V2_EVENTS) == {
        "low": 0,
        "high": 1742,
        "max": 35,
        "oom": 2,
        "oom_kill": 1,
        "oom_group_kill": 0,
    }


def test_a_v2_cgroup_gives_its_own_pressure_and_events(tmp_path: Path):
    (tmp_path / "memory.pressure").write_text(V2_PRESSURE)
    (tmp_path / "memory.events").write_text(V2_EVENTS)
    signals = Signals(Cgroup(str(tmp_path), 2), system=str(tmp_path / "absent"))
    p = signals.pressure()
    assert p is not None and p.source == "cgroup" and p.full[0] == 8.0
    assert signals.events() == {"high": 1742, "max": 35, "oom": 2, "oom_kill": 1}
    assert signals.journal_fields() == {
        "psi": {"some10": 12.34, "some60": 5.67, "full10": 8.0, "full60": 3.25, "src": "cgroup"},
        "events": {"high": 1742, "max": 35, "oom": 2, "oom_kill": 1},
    }


def test_nothing_readable_is_nothing_said(tmp_path: Path):
    signals = Signals(None, system=str(tmp_path / "absent"))
    assert signals.pressure() is None and signals.events() == {}
    assert signals.journal_fields() == {}


def _need_system_psi() -> None:
    try:
        with open(SYSTEM_PRESSURE) as f:
            f.read()
    except OSError as exc:
        if IN_CI:
            pytest.fail(f"{SYSTEM_PRESSURE} unreadable in CI: {exc}")
        pytest.skip(f"{SYSTEM_PRESSURE} unreadable (kernel without PSI, or psi=0): {exc}")


def test_the_machines_pressure_is_read_for_real():
    _need_system_psi()
    signals = Signals(Cgroup.of_self())
    first = signals.pressure()
    assert first is not None
    if Cgroup.of_self() is None or Cgroup.of_self().version == 1:  # type: ignore[union-attr]
        assert first.source == "system" and first.path == SYSTEM_PRESSURE
    for avgs in (first.some, first.full):
        assert all(0.0 <= v <= 100.0 for v in avgs), first
    second = signals.pressure()
    assert second is not None
    assert second.some_total >= first.some_total and second.full_total >= first.full_total
    assert second.full_total <= second.some_total  # all stalled is also some stalled


def test_a_real_oom_kill_is_counted_in_the_cgroups_events():
    with memory_cgroup(64 * MB) as cg:
        signals = Signals(cg.cgroup)
        before = signals.events()
        assert before.get("oom_kill") == 0
        if cg.version == 2:
            assert before["oom"] == 0 and before["max"] == 0
        # A child that touches 256 MiB in a 64 MiB cgroup without swap: killed by the kernel.
        proc = subprocess.run(
            [sys.executable, "-c", "b = bytearray(256 * 1024 * 1024)\nprint('survived')"],
            preexec_fn=cg.join,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr[-500:])
        after = wait_for(
            lambda: (e := signals.events()).get("oom_kill", 0) >= 1 and e,
            what="the oom_kill count",
        )
        assert isinstance(after, dict)
        assert after["oom_kill"] == 1
        if cg.version == 2:
            assert after["oom"] >= 1 and after["max"] > 0  # charges met the limit first
        else:
            assert set(after) == {"oom_kill"}
        assert after["oom_kill"] == cg.cgroup.read().oom_kills  # one count, two readers
        assert os.path.isdir(cg.path)


# ---------------------------------------------------------- where they are shown
def test_memwarden_check_shows_pressure_and_events():
    _need_system_psi()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    argv = [sys.executable, "-m", "memwarden.cli", "check"]
    out = subprocess.run([*argv, "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    psi = report["pressure"]
    assert psi["source"] in ("cgroup", "system") and len(psi["some"]) == len(psi["full"]) == 3
    assert psi["some_total_us"] >= psi["full_total_us"] >= 0
    own = Cgroup.of_self()
    if own is not None:
        assert "oom_kill" in report["memory_events"]
    text = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert text.returncode == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if x.startswith("pressure"))
    assert "some " in line and "full " in line and "avg10/60/300" in line, line
    if own is not None:
        assert any(x.startswith("mem events") and "oom_kill" in x for x in text.stdout.splitlines())


def test_journal_samples_carry_pressure_and_events(tmp_path: Path):
    _need_system_psi()
    from memwarden import Warden

    journal = tmp_path / "j.jsonl"
    w = Warden(
        soft_limit="100GB",
        measure="process",
        restart="none",
        journal=str(journal),
        state_dir=str(tmp_path / "state"),
    )
    try:
        w.watch_once()
    finally:
        w.close()
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    samples = [r for r in records if r["event"] == "sample"]
    assert samples, journal.read_text()
    psi = samples[-1]["psi"]
    assert set(psi) == {"some10", "some60", "full10", "full60", "src"}
    assert all(0.0 <= psi[k] <= 100.0 for k in ("some10", "some60", "full10", "full60"))
    if Cgroup.of_self() is not None:
        assert samples[-1]["events"]["oom_kill"] >= 0


def test_metrics_export_pressure_and_events(tmp_path: Path):
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from memwarden import Journal, Warden
    from memwarden.metrics import install

    registry = prometheus_client.CollectorRegistry()
    w = Warden(
        soft_limit="100GB", measure="process", journal=Journal(None), state_dir=str(tmp_path)
    )
    install(w, registry)
    # A v2 cgroup's files (fixtures): the figures as the kernel gave them.
    (tmp_path / "memory.pressure").write_text(V2_PRESSURE)
    (tmp_path / "memory.events").write_text(V2_EVENTS)
    w.signals = Signals(Cgroup(str(tmp_path), 2))
    get = registry.get_sample_value
    ratio = "memwarden_memory_pressure_ratio"
    full10 = {"kind": "full", "window": "10s", "source": "cgroup"}
    some300 = {"kind": "some", "window": "300s", "source": "cgroup"}
    assert get(ratio, full10) == pytest.approx(0.08)
    assert get(ratio, some300) == pytest.approx(0.012)
    stalled = "memwarden_memory_pressure_stalled_seconds_total"
    assert get(stalled, {"kind": "some", "source": "cgroup"}) == pytest.approx(4.830211)
    events = "memwarden_cgroup_memory_events_total"
    assert get(events, {"event": "high"}) == 1742 and get(events, {"event": "oom_kill"}) == 1
    assert get(events, {"event": "low"}) is None  # only high, max, oom, oom_kill
    # The exposition parses (a counter family, a gauge family).
    text = prometheus_client.generate_latest(registry).decode()
    kinds = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert kinds["memwarden_memory_pressure_stalled_seconds"] == "counter"
    assert kinds[ratio] == "gauge" and kinds["memwarden_cgroup_memory_events"] == "counter"
    # This machine's own: the system's PSI where the cgroup keeps none.
    _need_system_psi()
    w.signals = Signals(Cgroup.of_self())
    text = prometheus_client.generate_latest(registry).decode()
    families = text_string_to_metric_families(text)
    sources = {s.labels["source"] for f in families if f.name == ratio for s in f.samples}
    own = Cgroup.of_self()
    assert sources == ({"cgroup"} if own is not None and own.version == 2 else {"system"})


def test_heartbeats_and_status_show_pressure(tmp_path: Path):
    _need_system_psi()
    from memwarden import Journal, Warden
    from memwarden.cli.status import fleet_table
    from memwarden.fleet import heartbeat_of, warden_state

    w = Warden(
        soft_limit="100GB", measure="process", journal=Journal(None), state_dir=str(tmp_path)
    )
    beat = heartbeat_of(json.dumps(warden_state(w, "box-1")))
    assert beat is not None
    assert 0.0 <= beat["psi_full10"] <= beat["psi_some10"] + 100.0
    assert beat["psi_src"] in ("cgroup", "system")
    table = fleet_table({"wardens": [beat], "restarting": {}}).splitlines()
    assert "PSI10 SOME/FULL" in table[0]
    at = table[0].index("PSI10 SOME/FULL")
    cell = table[1][at:].split()[0]
    mark = "*" if beat["psi_src"] == "system" else ""
    assert cell == f"{beat['psi_some10']:.1f}/{beat['psi_full10']:.1f}%{mark}"
    assert ("whole machine" in table[-1]) == (mark == "*")
    # Of the wrong type, a heartbeat is malformed; absent (an older warden), a dash.
    assert heartbeat_of(json.dumps({**beat, "psi_full10": "high"})) is None
    old = {k: v for k, v in beat.items() if not k.startswith("psi_")}
    row = fleet_table({"wardens": [old], "restarting": {}}).splitlines()[1]
    assert row[at:].split()[0] == "-"


def test_memwarden_runs_samples_carry_pressure(tmp_path: Path):
    _need_system_psi()
    journal = tmp_path / "run.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    env.update(
        MEMWARDEN_JOURNAL=str(journal),
        MEMWARDEN_SOFT_LIMIT="4GB",
        MEMWARDEN_STATE_DIR=str(tmp_path / "state"),
    )
    child = "import time\ntime.sleep(600)"
    run = subprocess.Popen(
        [sys.executable, "-m", "memwarden.cli", "run", "--", sys.executable, "-c", child],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def samples() -> list[dict]:
        try:
            text = journal.read_text()
        except OSError:
            return []
        whole = text[: text.rfind("\n") + 1].splitlines()  # a line being written waits
        return [r for r in map(json.loads, whole) if r["event"] == "sample"]

    try:
        found = wait_for(lambda: len(samples()) >= 2 and samples(), what="two samples")
    finally:
        run.send_signal(signal.SIGTERM)
        try:
            run.wait(timeout=60)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
    assert isinstance(found, list)
    assert all(set(s["psi"]) == {"some10", "some60", "full10", "full60", "src"} for s in found)


THRASHING = (
    "some avg10=71.00 avg60=40.00 avg300=9.00 total=90000000\n"
    "full avg10=60.00 avg60=30.00 avg300=7.00 total=70000000\n"
)


def _pressure_warden(tmp_path: Path, version: int) -> Warden:
    """An in-process warden with the pressure trigger on (dry run: decides, never acts),
    its PSI read from a thrashing cgroup's file of the given version."""
    from memwarden import Journal

    (tmp_path / "memory.pressure").write_text(THRASHING)
    w = Warden(
        soft_limit="100GB",
        measure="process",
        journal=Journal(None),
        state_dir=str(tmp_path / "state"),
        pressure_full="40%",
        pressure_hold="0.5s",
        dry_run=True,
    )
    w.signals = Signals(Cgroup(str(tmp_path), version), system=str(tmp_path / "memory.pressure"))
    return w


def test_the_watchdog_acts_on_the_cgroups_full_pressure(tmp_path: Path):
    w = _pressure_warden(tmp_path, 2)
    assert w.signals.full10() == pytest.approx(0.60)
    decision = wait_for(
        lambda: (d := w.watch_once()) is not None and "pressure" in d.reason and d,
        timeout=60,
        what="a decision for the pressure",
    )
    assert decision.reason.startswith("memory pressure: full 60% for "), decision
    assert w.policy.pressured


def test_the_systems_pressure_is_never_acted_on(tmp_path: Path):
    w = _pressure_warden(tmp_path, 1)  # v1: the file read is the system-wide one
    assert w.signals.pressure_source == "system" and w.signals.full10() is None
    until = time.monotonic() + 1.5  # three times the hold
    while time.monotonic() < until:
        decision = w.watch_once()
        assert decision is not None and decision.action is Action.OK, decision
        time.sleep(0.05)
    assert w.policy.pressure is None and not w.policy.pressured
