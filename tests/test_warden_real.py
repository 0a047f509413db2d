"""The engine with real processes: reclaim, restart by signal, drain, hard kill, once only."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import wait_for
from memwarden import Hooks, Warden
from memwarden.config import Config
from memwarden.coordination import HostLock
from memwarden.gauges import ProcessGauge
from memwarden.pace import Pace
from memwarden.policy import Action, Decision

MB = 1024 * 1024
PRELUDE = """
import os, sys, threading, time
from memwarden import Warden, Hooks, workload
from memwarden.gauges.proc import self_rss
MB = 1024 * 1024
base = self_rss()
"""


def run_script(body: str, tmp_path, timeout: float = 120) -> subprocess.CompletedProcess:
    code = PRELUDE + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=env,
    )


def journal(tmp_path) -> list[dict]:
    with open(tmp_path / "j.jsonl") as f:
        return [json.loads(line) for line in f]


def test_reclaim_first_then_restart_by_own_signal(tmp_path):
    out = run_script(
        """
        w = Warden(soft_limit=base + 80 * MB, hard_limit=base + 900 * MB, measure="process",
                   grace=0, min_uptime=0, restart="signal", journal="j.jsonl", state_dir=".")
        w.soft_limit_bytes = None
        with w.job("fragmenting", "j1"):
            workload.fragment(mb=200, threads=4, keep_every=20, together=True)
        print("after job 1", flush=True)
        with w.job("leaking", "j2"):
            workload.leak(mb=150)
        time.sleep(60)
        print("not restarted", flush=True)
        """.replace("base + 80 * MB", "f'{(base + 80 * MB) // 1024}'").replace(
            "base + 900 * MB", "f'{(base + 900 * MB) // 1024}'"
        ),
        tmp_path,
    )
    assert out.returncode == -signal.SIGTERM, out.stderr
    assert "after job 1" in out.stdout and "not restarted" not in out.stdout
    records = journal(tmp_path)
    events = [r["event"] for r in records]
    assert events[:2] == ["job", "reclaim"]  # job 1 bloated; reclaim brought it back under
    first_reclaim = records[1]
    assert first_reclaim["freed"] > 60 * MB
    assert first_reclaim["total_after"] < first_reclaim["total_before"]
    assert "restart" not in events[:3]
    restart = next(r for r in records if r["event"] == "restart")
    assert restart["action"] == "signal" and "over soft limit" in restart["reason"]
    assert first_reclaim["cause"] == "over_soft_limit" and restart["cause"] == "no_job_in_hand"
    jobs = [r for r in records if r["event"] == "job"]
    assert [j["job"] for j in jobs] == ["fragmenting", "leaking"]
    assert jobs[1]["rss_after"] - jobs[1]["rss_before"] >= 140 * MB


def test_watchdog_kills_mid_job_at_the_hard_limit_with_its_children(tmp_path):
    out = run_script(
        """
        import subprocess
        kid = subprocess.Popen(["sleep", "300"])
        print("kid", kid.pid, flush=True)
        w = Warden(soft_limit=f"{(base + 100 * MB) // 1024}",
                   hard_limit=f"{(base + 200 * MB) // 1024}", measure="process", interval=0.05,
                   restart="none", journal="j.jsonl", state_dir=".").start()
        with w.job("grows_forever", "big-1"):
            for _ in range(100):
                workload.leak(mb=10)
                time.sleep(0.05)
        print("job finished", flush=True)
        """,
        tmp_path,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr
    assert "job finished" not in out.stdout
    kid = int(out.stdout.split()[1])
    wait_for(lambda: not os.path.exists(f"/proc/{kid}") or _zombie(kid), 30, what="kid gone")
    kill = next(r for r in journal(tmp_path) if r["event"] == "kill")
    assert kill["in_flight"] == [{"job": "grows_forever", "job_id": "big-1"}]
    assert "hard limit" in kill["reason"]
    if "rising" in kill["reason"]:  # on course to cross it before the next reading
        assert kill["limit"] - 20 * MB < kill["total"] < kill["limit"]
    else:
        assert kill["total"] >= kill["limit"]


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_drain_waits_for_in_flight_jobs_before_the_restart(tmp_path):
    out = run_script(
        """
        def drain():
            print("drained", flush=True)
        w = Warden(soft_limit=f"{(base + 50 * MB) // 1024}", measure="process", grace=0,
                   min_uptime=0, reclaim=False, interval=0.05, restart="exit", exit_code=75,
                   shutdown_timeout=30, journal="j.jsonl", state_dir=".",
                   hooks=Hooks(drain=drain)).start()
        def long_job():
            with w.job("long", "L1"):
                workload.leak(mb=80)
                time.sleep(1.5)
                print("long job done", flush=True)
        t = threading.Thread(target=long_job)
        t.start()
        t.join()
        time.sleep(30)
        """,
        tmp_path,
    )
    assert out.returncode == 75, out.stderr
    lines = out.stdout.split()
    assert "drained" in out.stdout and "long job done" in out.stdout
    assert out.stdout.index("drained") < out.stdout.index("long job done"), lines
    restart = next(r for r in journal(tmp_path) if r["event"] == "restart")
    assert restart["in_flight"] == [{"job": "long", "job_id": "L1"}]
    assert restart["action"] == "exit"


class Broken:
    source = "broken"

    def read(self):
        raise RuntimeError("gauge exploded")


def test_the_warden_never_fails_a_job(caplog, tmp_path):
    w = Warden(gauge=Broken(), soft_limit="1MB", restart="none", state_dir=str(tmp_path))
    caplog.set_level(logging.ERROR, logger="memwarden")
    result = []
    with w.job("fine", 1):
        result.append("done")
    assert result == ["done"]
    assert w.check() is None and w.watch_once() is None
    assert "gauge exploded" in caplog.text and "job unaffected" in caplog.text


def test_an_unwritable_journal_does_not_fail_a_job(caplog, tmp_path):
    w = Warden(
        soft_limit="100GB", journal="/proc/nope/j.jsonl", restart="none", state_dir=str(tmp_path)
    )
    with w.job("fine", 1):
        pass
    assert w.journal.recent[-1]["event"] == "job"
    assert "not written" in caplog.text


def test_starting_above_the_soft_limit_is_said_loudly_and_not_restarted(caplog, tmp_path):
    w = Warden(
        soft_limit="1MB",
        measure="process",
        reclaim=False,
        grace=0,
        min_uptime=0,
        restart="none",
        state_dir=str(tmp_path),
    )
    assert "starts at" in caplog.text and "restarts cannot bring it under" in caplog.text
    d = w.check()
    assert d.action is Action.WAIT and "since start" in d.reason
    assert w.counts["restarts"] == 0


def test_no_quota_no_limit_is_off_and_said_once(caplog, tmp_path):
    w = Warden(env={}, restart="none", state_dir=str(tmp_path), measure="tree", quota=None)
    if w.quota.limit is not None:
        pytest.skip("this process has a cgroup limit: the guard is on")
    assert not w.enabled and w.check() is None and w.check() is None
    assert caplog.text.count("the guard is off") == 1


def test_host_lock_is_once_per_host_and_freed_by_death(tmp_path):
    path = str(tmp_path / "lock")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import time
            from memwarden.coordination import HostLock
            assert HostLock({path!r}).try_acquire()
            print("held", flush=True)
            time.sleep(300)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        mine = HostLock(path)
        assert not mine.try_acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert wait_for(mine.try_acquire, 30, what="the lock after the holder died")
        mine.release()
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_restart_history_caps_restarts_across_lifetimes(tmp_path):
    kw = dict(
        soft_limit="1KB",
        hard_limit="100GB",
        measure="process",
        reclaim=False,
        grace=0,
        min_uptime=0,
        max_restarts=2,
        restart="none",
        state_dir=str(tmp_path),
    )
    for _ in range(2):  # two lifetimes, each restarts once
        w = Warden(**kw)
        w.policy.starts_above = False  # as if it had grown, not started big
        assert w.check().action is Action.RESTART
        w.close()  # the lifetime ends: its host lock goes
    w = Warden(**kw)
    w.policy.starts_above = False
    d = w.check()
    assert d.action is Action.WAIT and "2 restarts in the last" in d.reason


def test_the_watchdog_samples_faster_over_the_soft_limit(tmp_path):
    kw = dict(
        measure="process",
        restart="none",
        state_dir=str(tmp_path),
        interval=2,
        alert_interval=0.05,
        reclaim=False,
    )
    calm = Warden(soft_limit="100GB", **kw)
    calm.check()
    assert calm.watch_interval() == 2
    hot = Warden(soft_limit="1KB", **kw)
    hot.watch_once()
    assert hot.watch_interval() == 0.05
    assert hot.policy.lookahead == 0.05  # the policy looks as far ahead as the next reading


class DearGauge(ProcessGauge):
    """Own RSS, read at the price of a big process tree by PSS (5 ms of real CPU)."""

    def read(self):
        end = time.thread_time() + 0.005
        while time.thread_time() < end:
            pass
        return super().read()


def test_dear_readings_stretch_the_alert_interval_to_their_budget(tmp_path):
    w = Warden(
        gauge=DearGauge(),
        soft_limit="1KB",
        restart="none",
        reclaim=False,
        state_dir=str(tmp_path),
        interval=2,
        alert_interval=0.02,
    )
    for _ in range(3):
        w.watch_once()
    # 5 ms a reading at no more than 2% of a core: one reading per 0.25 s, not per 20 ms.
    assert 0.2 <= w.watch_interval() <= 2
    assert w.policy.lookahead == w.watch_interval()


def test_alert_ticks_are_not_all_journaled(tmp_path):
    """Over the soft limit the watchdog reads every alert interval, but writes a ``sample``
    record once a second (and whenever it acts)."""
    w = Warden(
        measure="process",
        soft_limit="1KB",
        restart="none",
        reclaim=False,
        journal=str(tmp_path / "j.jsonl"),
        state_dir=str(tmp_path),
        interval=0.1,
        alert_interval=0.01,
    )
    start = time.monotonic()
    ticks = 0
    while time.monotonic() - start < 2.2:
        w.watch_once()
        ticks += 1
        time.sleep(w.watch_interval())
    samples = [r for r in journal(tmp_path) if r["event"] == "sample"]
    assert ticks >= 50
    assert 2 <= len(samples) <= 4  # about one a second: at 0, 1 and 2 s


def test_a_fast_rise_under_the_soft_limit_already_brings_the_alert_pace(tmp_path):
    """Under the soft limit but growing fast enough to pass it by the next regular reading:
    the watchdog already reads at the alert interval; a slow rise does not."""
    soft = 4 * 1024 * MB  # far above this process
    w = Warden(
        measure="process",
        soft_limit=f"{soft // 1024}",
        restart="none",
        reclaim=False,
        state_dir=str(tmp_path),
        interval=1,
        alert_interval=0.02,
    )
    w.watch_once()
    assert w.watch_interval() == 1
    # Readings rising 4 GiB/s (told to the policy): 1 s ahead is past the soft limit.
    t = time.time()
    w.policy.observe(0, t + 1)
    w.policy.observe(soft, t + 2)
    assert w.policy.rise == soft and w.watch_interval() == 0.02
    # A slow rise now, but a job of this worker grew 4 GiB/s: that is within reach.
    w.policy.observe(soft + 1024, t + 3)
    assert w.policy.rise == 1024 and w.watch_interval() == 0.02


def test_the_fastest_rise_seen_keeps_the_alert_pace_where_it_would_reach_the_limit():
    pace = Pace(Config.from_env({}, interval="0.1", alert_interval="0.02"), 435 * MB)
    assert pace.interval_after(420 * MB, 0.0) == 0.1  # quiet, and no fast job seen yet
    assert pace.interval_after(200 * MB, 800 * MB) == 0.1  # fast, but 280 MiB next time
    assert pace.interval_after(420 * MB, 0.0) == 0.02  # 800 MiB/s from 420 passes 435
    assert pace.interval_after(300 * MB, 0.0) == 0.1  # from 300 it would not


def test_a_reading_asked_for_soon_is_not_stretched_by_its_cost():
    pace = Pace(Config.from_env({}, interval="0.1", alert_interval="0.02"), 435 * MB)
    pace.read_cost = 0.005  # a tree of processes by PSS: 5 ms of CPU a reading
    assert pace.interval_after(450 * MB, 0.0) == 0.25  # over soft: 2% of a core at most
    assert pace.interval_after(450 * MB, 0.0, urgent=True) == 0.02  # a crossing to confirm
    pace.interval_after(450 * MB, 800 * MB, urgent=True)
    assert pace.fastest_rise == 800 * MB  # an urgent reading's rise is remembered too


def test_a_kill_of_one_child_during_a_drain_does_not_cancel_the_restart(tmp_path):
    """Draining for a restart, a job's child crosses the hard limit and is killed alone: the
    worker lives on, drained, and still needs its restart (it would idle forever)."""
    restarts: list[str] = []
    running, drained = threading.Event(), threading.Event()
    running.set()

    class Recorded:
        name = "recorded"

        def restart(self, reason: str) -> None:
            restarts.append(reason)

    def kill_the_child() -> None:  # as the RQ horse / Celery pool-child kill: we recover
        running.clear()
        threading.Timer(0.3, w.policy.did_recover).start()

    w = Warden(
        measure="process",
        soft_limit="1MB",
        hard_limit="1GB",
        restarter=Recorded(),
        reclaim=False,
        grace=0,
        min_uptime=0,
        state_dir=str(tmp_path),
        shutdown_timeout=30,
        hooks=Hooks(
            drain=drained.set,
            in_flight=lambda: [{"job": "big", "job_id": 1}] if running.is_set() else [],
            kill=kill_the_child,
        ),
    )
    over = Decision(Action.RESTART, "over soft limit", 2 * MB, MB)
    w._restart(over)
    assert drained.wait(10)  # the sequence now waits for the job in flight
    w._kill(Decision(Action.KILL, "over hard limit", 2 * 1024 * MB, 1024 * MB))
    wait_for(lambda: restarts, 10, 0.05, "the restart after the child's kill")
    assert restarts == ["over soft limit"]


def test_asked_to_reclaim_without_deciding_the_recycle_waits_for_the_job_end(tmp_path):
    """A pool child asked by its worker reclaims at once; still over its share it decides to
    recycle only where it can act on it, after a job (an idle child would run one more)."""
    out = run_script(
        """
        recycled = []
        w = Warden(soft_limit=f"{base + 40 * MB}B", measure="process", grace=3600,
                   min_uptime=0, restart="none", journal="j.jsonl", state_dir=".",
                   hooks=Hooks(recycle=lambda why: recycled.append(why) or True))
        kept = workload.leak(mb=100)  # really held: the reclaim cannot bring it under
        d = w.reclaim_now("asked by the worker", False)
        print(d.action.name, len(recycled), flush=True)
        with w.job("next", "j1"):
            pass
        print(len(recycled), flush=True)
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    asked, after_job = out.stdout.splitlines()[:2]
    assert asked == "RECYCLE_CHILD 0"  # what it would do, not done: nothing to act on yet
    assert after_job == "1"  # the job's end decided it
    events = [r["event"] for r in journal(tmp_path)]
    assert events == ["reclaim", "job", "restart"], events
    assert journal(tmp_path)[2]["action"] == "recycle"


def test_job_end_readings_close_together_are_not_projected(tmp_path):
    """Jobs ending a few ms apart, each having grown 40 MiB, make a rise of GiB/s between
    their end readings; the jobs' growth is over, so no projection kills the worker (the
    hard limit is judged where memory is; the watchdog projects over its own pace)."""
    out = run_script(
        """
        import dataclasses
        from memwarden.policy import MAX_LOOKAHEAD
        w = Warden(soft_limit=f"{base + 30 * MB}B", hard_limit="100GB",
                   measure="process", grace=3600, min_uptime=0, restart="none",
                   reclaim=False, journal="j.jsonl", state_dir=".")
        w.policy.lookahead = 0.1  # as a watchdog reading set it, slow and under soft
        for n in range(3):
            with w.job("grows", f"j{n}"):
                workload.leak(mb=40)
        # The last job ends 4 MiB under the hard limit: a rise of 40 MiB in less than a
        # second, projected ahead, is past it however slowly a busy machine runs the jobs.
        hard = w.last_sample.total + 44 * MB
        w.policy.limits = dataclasses.replace(w.policy.limits, hard=hard)
        with w.job("grows", "j3"):
            workload.leak(mb=40)
        p = w.policy
        ahead = p.rate * min(p.lookahead, MAX_LOOKAHEAD, p.rate_span)
        print("alive", w.last_sample.total, int(ahead), hard, flush=True)
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr  # a projection kill is SIGKILL (-9)
    word, total, ahead, hard = out.stdout.split()
    assert word == "alive" and int(total) < int(hard), out.stdout
    assert int(total) + int(ahead) >= int(hard), out.stdout  # projected, it would cross...
    assert "kill" not in [r["event"] for r in journal(tmp_path)]  # ...judged alone, it did not


def test_a_stop_signal_in_our_bookkeeping_is_held_then_goes_on_not_swallowed(tmp_path):
    """RQ's stop handler raises ``StopRequested`` wherever the main thread is when the worker
    is idle — also inside our after-job record. It must neither cut the record nor be
    swallowed at the hook boundary (the worker would ignore its stop)."""
    out = run_script(
        """
        import signal
        from memwarden.warden import signals_held, swallow_but

        class StopRequested(Exception):
            pass

        def request_stop(signum, frame):
            raise StopRequested()

        signal.signal(signal.SIGINT, request_stop)
        steps = []

        @swallow_but(StopRequested)
        def after_job():
            with signals_held([signal.SIGINT]):
                os.kill(os.getpid(), signal.SIGINT)  # the stop comes mid-way
                time.sleep(0.05)
                steps.append("record written")

        try:
            after_job()
        except StopRequested:
            steps.append("stop went on")

        @swallow_but(StopRequested)
        def broken():
            raise ValueError("a bug of ours")

        broken()
        steps.append("ours swallowed")
        print(steps, signal.getsignal(signal.SIGINT) is request_stop)
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "['record written', 'stop went on', 'ours swallowed'] True" in out.stdout, out.stdout
    assert "a bug of ours" in out.stderr  # logged, not raised


def test_signals_held_off_the_main_thread_holds_nothing_and_does_not_fail():
    from memwarden.warden import signals_held

    ran: list[str] = []

    def bookkeeping() -> None:
        with signals_held([signal.SIGINT]):  # signal.signal() would raise here
            ran.append("done")

    t = threading.Thread(target=bookkeeping)
    t.start()
    t.join(10)
    assert ran == ["done"]
