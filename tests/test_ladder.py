"""The ladder with real processes and default settings: pause intake, a graceful restart
that no rung starves, the restart cap that stops loops but not cures, kernel OOM kills said.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from cgroups import memory_cgroup
from conftest import wait_for
from memwarden.policy import Action
from memwarden.warden import RestartHistory, Warden

MB = 1024 * 1024
PRELUDE = """
import os, signal, sys, threading, time
from memwarden import Warden, Hooks, workload
from memwarden.gauges.proc import self_rss
MB = 1024 * 1024
base = self_rss()
def at(mb):  # a limit this many MiB above where the process started, in KiB
    return f"{(base + mb * MB) // 1024}"
"""


def script(body: str) -> list[str]:
    return [sys.executable, "-c", PRELUDE + textwrap.dedent(body)]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}


def run_script(body: str, tmp_path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        script(body),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=clean_env(),
    )


def journal(tmp_path, name: str = "j.jsonl") -> list[dict]:
    with open(tmp_path / name) as f:
        return [json.loads(line) for line in f]


def test_intake_pauses_over_the_soft_limit_and_resumes_under_it(tmp_path):
    """A job holds memory over the soft limit: intake pauses (the job goes on); the memory
    goes back and intake resumes, with no restart."""
    out = run_script(
        """
        calls = []
        w = Warden(soft_limit=at(60), hard_limit=at(400), measure="process",
                   restart="signal", journal="j.jsonl", state_dir=".",
                   hooks=Hooks(pause=lambda: calls.append("pause"),
                               resume=lambda: calls.append("resume")))
        w.start()
        with w.job("spike", "j1"):
            buf = bytearray(100 * MB)  # one mmap'd block: live, no reclaim helps
            buf[:: 4096] = b"x" * len(buf[:: 4096])
            deadline = time.time() + 30
            while "pause" not in calls and time.time() < deadline:
                time.sleep(0.01)
            del buf
        deadline = time.time() + 30
        while "resume" not in calls and time.time() < deadline:
            time.sleep(0.01)
        w.close()
        print(",".join(calls), flush=True)
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pause,resume"]
    events = [r["event"] for r in journal(tmp_path)]
    assert "pause" in events and "resume" in events
    assert events.index("pause") < events.index("resume")
    assert "restart" not in events and "kill" not in events


def test_over_the_soft_limit_with_no_job_in_hand_restarts_gracefully_at_once(tmp_path):
    """Defaults (grace 120 s, min uptime 30 s): a job leaves memory over the soft limit and
    nothing is running: nothing will bring it down, and the drain is instant. The restart is
    the stop signal now, not a hard kill minutes later."""
    out = run_script(
        """
        signal.signal(signal.SIGTERM, lambda *a: (print("stopped", flush=True), os._exit(0)))
        w = Warden(soft_limit=at(60), hard_limit=at(400), measure="process",
                   journal="j.jsonl", state_dir=".")
        with w.job("leaks", "j1"):  # the job's end decides (no watchdog yet: no mid-job look)
            workload.leak(mb=100)
        w.start()
        time.sleep(60)
        print("not restarted", flush=True)
        """,
        tmp_path,
    )
    assert out.stdout.split() == ["stopped"], out.stderr
    records = journal(tmp_path)
    restart = next(r for r in records if r["event"] == "restart")
    assert "no job in hand" in restart["reason"]
    assert restart["in_flight"] == []
    assert "kill" not in [r["event"] for r in records]


def test_a_restart_waits_while_a_hook_says_the_memory_is_held_elsewhere(tmp_path):
    """The contract's ``holds_elsewhere`` (RQ's horse): the restart the policy wants over
    the soft limit waits, on every path (job end and watchdog), until the hook lets go."""
    out = run_script(
        """
        signal.signal(signal.SIGTERM, lambda *a: (print("stopped", flush=True), os._exit(0)))
        asked, held = [], threading.Event()
        held.set()
        def holds_elsewhere(total):
            asked.append(total)
            return held.is_set()
        w = Warden(soft_limit=at(60), hard_limit=at(400), measure="process",
                   journal="j.jsonl", state_dir=".", hooks=Hooks(holds_elsewhere=holds_elsewhere))
        with w.job("leaks", "j1"):
            workload.leak(mb=100)
        w.start()
        deadline = time.time() + 60
        while len(asked) < 5 and time.time() < deadline:
            time.sleep(0.01)
        print("held" if len(asked) >= 5 else "not asked", flush=True)
        held.clear()
        time.sleep(60)
        print("not restarted", flush=True)
        """,
        tmp_path,
    )
    assert out.stdout.split() == ["held", "stopped"], out.stderr
    events = [r["event"] for r in journal(tmp_path)]
    assert "restart" in events and "kill" not in events


def test_fast_growth_restarts_gracefully_before_the_hard_limit(tmp_path):
    """Defaults but the limits: a job keeps 4 MiB every 0.1 s (40 MiB/s) in a worker with
    no reclaim to win. Soft to hard is 80 MiB, two seconds: the grace (120 s) and the
    minimum uptime (30 s) are cut short and the restart is the stop signal, while the job
    is still in hand; the hard limit is never reached."""
    out = run_script(
        """
        stop = threading.Event()
        def on_term(*a):
            stop.set()
        signal.signal(signal.SIGTERM, on_term)
        w = Warden(soft_limit=at(100), hard_limit=at(180), measure="process",
                   journal="j.jsonl", state_dir=".")
        w.start()
        with w.job("grows", "j1"):
            while not stop.is_set() and self_rss() < base + 400 * MB:
                workload.leak(mb=4)
                time.sleep(0.1)
        print("stopped" if stop.is_set() else "not stopped", flush=True)
        w.close()
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["stopped"]
    records = journal(tmp_path)
    events = [r["event"] for r in records]
    assert "kill" not in events
    restart = next(r for r in records if r["event"] == "restart")
    assert "rising" in restart["reason"]
    assert [j["job"] for j in restart["in_flight"]] == ["grows"]


def test_the_restart_cap_stops_loops_not_cures(tmp_path):
    """Four restarts in the hour of lifetimes that started low and grew: each one cured, so
    the fourth is not held back by the cap (3 an hour). Lifetimes that start near the soft
    limit loop: their third restart is the last one allowed."""
    body = """
        cured = sys.argv[-1] == "cured"
        w = Warden(soft_limit=at(60) if cured else f"{base * 21 // 20 // 1024}",
                   hard_limit=at(800), measure="process", reclaim=False, grace=0,
                   min_uptime=0, restart="none", state_dir=".")
        w.policy.starts_above = False  # judged as a loop or a cure, not refused outright
        workload.leak(mb=100 if cured else 10)
        d = w.check()
        print(d.action.name, d.capped, flush=True)
        w.close()
        """
    for how in ("cured", "looping"):
        state = tmp_path / how
        state.mkdir()
        seen = []
        for _ in range(4):
            out = subprocess.run(
                [*script(body), how],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=state,
                env=clean_env(),
            )
            assert out.returncode == 0, out.stderr
            seen.append(out.stdout.strip())
        loops = [lp for _, lp in RestartHistory(str(state / "restarts.json")).entries()]
        if how == "cured":
            assert seen == ["RESTART False"] * 4
            assert loops == [False] * 4
        else:
            assert seen == ["RESTART False"] * 3 + ["WAIT True"]
            assert loops == [True] * 3


def test_a_kernel_oom_kill_is_said_by_the_next_worker(tmp_path):
    """A process in a 64 MiB cgroup is killed by the kernel; the warden started next in the
    same cgroup journals an ``oom_kill`` record and says so in its log."""
    with memory_cgroup(64 * MB) as cg:
        state = tmp_path / "state"
        first = subprocess.run(
            script(
                f"""
                w = Warden(quota="64MB", journal="j.jsonl", state_dir={str(state)!r})
                workload.leak(mb=200)  # no watchdog: the kernel acts
                """
            ),
            cwd=tmp_path,
            env=clean_env(),
            preexec_fn=cg.join,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert first.returncode == -signal.SIGKILL, first.stderr
        wait_for(lambda: cg.oom_kills() >= 1, 30, 0.1, "the kernel's OOM kill")
        second = subprocess.run(
            script(
                f"""
                w = Warden(quota="64MB", journal="j2.jsonl", state_dir={str(state)!r})
                w.close()
                """
            ),
            cwd=tmp_path,
            env=clean_env(),
            preexec_fn=cg.join,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert second.returncode == 0, second.stderr
    assert "OOM-killed" in second.stderr
    oom = [r for r in journal(tmp_path, "j2.jsonl") if r["event"] == "oom_kill"]
    assert len(oom) == 1 and oom[0]["kills"] >= 1 and oom[0]["before_start"] is True


def test_an_oom_kill_is_said_once(tmp_path):
    """The count is kept: the worker after the one that said it does not say it again."""
    with memory_cgroup(64 * MB) as cg:
        state = tmp_path / "state"
        body = f"""
            w = Warden(quota="64MB", journal="j.jsonl", state_dir={str(state)!r})
            if sys.argv[-1] == "grow":
                workload.leak(mb=200)
            w.close()
            """
        for arg in ("grow", "look", "look"):
            subprocess.run(
                [*script(body), arg],
                cwd=tmp_path,
                env=clean_env(),
                preexec_fn=cg.join,
                capture_output=True,
                timeout=120,
            )
    oom = [r for r in journal(tmp_path) if r["event"] == "oom_kill"]
    assert len(oom) == 1


def test_the_warden_keeps_intake_paused_once_a_restart_is_under_way(tmp_path):
    """Resume never undoes a drain: under the soft limit again during a restart, intake
    stays paused."""
    calls: list[str] = []
    from memwarden import Hooks

    w = Warden(
        soft_limit="100GB",
        hard_limit="200GB",
        measure="process",
        restart="none",
        state_dir=str(tmp_path),
        hooks=Hooks(pause=lambda: calls.append("pause"), resume=lambda: calls.append("resume")),
    )
    try:
        w.policy.paused = True
        w._steer_intake(w.policy.observe(10**12, 1.0))  # over: pause
        w.policy.did_restart(2.0)
        w._steer_intake(w.policy.observe(1, 3.0))  # under, restart under way: no resume
        assert calls == ["pause"]
    finally:
        w.close()


def test_a_kill_counts_the_jobs_in_flight_at_its_instant_and_names_them_once(tmp_path):
    """The jobs of a kill are those started and not finished when it was decided: one that
    starts while the kill is carried out is not among them, and the hook (poison counting),
    the record and the log line name the same jobs."""
    from memwarden import Hooks
    from memwarden.policy import Decision

    seen: list[list[str]] = []
    w: Warden

    def before_kill(in_flight):
        seen.append([j["job_id"] for j in in_flight])
        w.job_started("late", "j-late")  # received after the decision
        w.job_finished("j-a")  # ends a moment after the decision: still died with it
        return None

    w = Warden(
        soft_limit="100GB",
        measure="process",
        journal=str(tmp_path / "j.jsonl"),
        state_dir=str(tmp_path),
        hooks=Hooks(before_kill=before_kill, kill=lambda: None),
    )
    w.job_started("a", "j-a")
    w.job_started("b", "j-b")
    w._kill(Decision(Action.KILL, "over hard limit", 10, 5))
    kill = next(r for r in journal(tmp_path) if r["event"] == "kill")
    assert seen == [["j-a", "j-b"]]
    assert [j["job_id"] for j in kill["in_flight"]] == ["j-a", "j-b"]


def test_under_a_shared_cgroup_figure_the_idle_sibling_leaves_the_kill_to_the_grower(tmp_path):
    """Two worker processes in one 256 MiB cgroup, each with its own warden on the cgroup's
    figure (defaults): one grows with its job in hand, the other is idle. At the hard limit
    the grower is killed; the idle sibling, smaller and with nothing in hand, lives on."""
    body = """
        which = sys.argv[-1]
        w = Warden(journal=f"{which}.jsonl", state_dir=which, restart="none")
        w.start()
        print("ready", flush=True)
        if which == "grower":
            with w.job("grows", "g1"):
                while True:
                    workload.leak(mb=4)
                    time.sleep(0.05)
        deadline = time.time() + 60
        while not os.path.exists("grower.done") and time.time() < deadline:
            time.sleep(0.05)
        w.close()
        print("idle lived", flush=True)
        """
    with memory_cgroup(256 * MB) as cg:
        procs = {
            which: subprocess.Popen(
                [*script(body), which],
                cwd=tmp_path,
                env=clean_env(),
                preexec_fn=cg.join,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for which in ("idle", "grower")
        }
        try:
            assert procs["grower"].wait(120) == -signal.SIGKILL
            (tmp_path / "grower.done").touch()
            out, err = procs["idle"].communicate(timeout=120)
        finally:
            for p in procs.values():
                p.kill()
                p.wait()
        assert cg.oom_kills() == 0
    assert procs["idle"].returncode == 0, err
    assert "idle lived" in out
    kills = [r for r in journal(tmp_path, "grower.jsonl") if r["event"] == "kill"]
    assert len(kills) == 1 and [j["job"] for j in kills[0]["in_flight"]] == ["grows"]
    assert "kill" not in [r["event"] for r in journal(tmp_path, "idle.jsonl")]


#: The spike tests' worker: a warden whose soft limit is 60 MiB above the start, intake
#: hooks that note their calls, and a job's climb over it.
SPIKE = """
import mmap
signal.signal(signal.SIGTERM, lambda *a: (print("stopped", flush=True), os._exit(0)))
calls = []
w = Warden(soft_limit=at(60), hard_limit=at(400), measure="process",
           journal="j.jsonl", state_dir=".",
           hooks=Hooks(pause=lambda: calls.append("pause"),
                       resume=lambda: calls.append("resume")))
w.start()

def climb():
    \"\"\"100 MiB at about 200 MiB/s, each block its own mmap (glibc's threshold moves:
    freed, it is given back), held until the warden decides a restart.\"\"\"
    held = []
    for _ in range(10):
        held.append(mmap.mmap(-1, 10 * MB))
        held[-1][:: 4096] = b"x" * len(held[-1][:: 4096])
        time.sleep(0.05)
    deadline = time.time() + 30
    while not w.policy.restarting and time.time() < deadline:
        time.sleep(0.01)
    return held
"""


def spike(body: str) -> str:
    return SPIKE + textwrap.dedent(body)


def test_a_spike_that_goes_back_down_with_its_job_calls_the_restart_off(tmp_path):
    """A job climbs fast over the soft limit (a graceful restart is decided: it would reach
    the hard limit before the grace ends), then frees what it took and ends. Intake was
    paused: the jobs in hand end first, memory is back under the soft limit, and the
    restart is called off — intake resumes, nothing is stopped."""
    out = run_script(
        spike(
            """
        with w.job("spike", "s1"):
            held = climb()
            held.clear()
        deadline = time.time() + 30
        while "resume" not in calls and time.time() < deadline:
            time.sleep(0.01)
        w.close()
        print(",".join(calls), flush=True)
        """
        ),
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pause,resume"], out.stdout
    events = [r["event"] for r in journal(tmp_path)]
    assert events.index("restart") < events.index("restart_called_off") < events.index("resume")
    assert "kill" not in events


def test_a_restart_is_called_off_once_not_again_moments_later(tmp_path):
    """A spike that goes back down calls its restart off; a second crossing seconds after
    that is no passing spike but the level itself (a fragmented heap, the load): its
    restart goes on (a field run resumed intake twice and the kernel killed the worker)."""
    out = run_script(
        spike(
            """
        for n in range(2):
            with w.job("spike", f"s{n}"):
                held = climb()
                held.clear()
            deadline = time.time() + 30
            while calls.count("resume") <= n and time.time() < deadline:
                time.sleep(0.01)
        print("not stopped", ",".join(calls), flush=True)
        """
        ),
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["stopped"], out.stdout
    events = [r["event"] for r in journal(tmp_path)]
    assert events.count("restart") == 2 and events.count("restart_called_off") == 1, events
    assert "kill" not in events, events


def test_a_restart_is_not_called_off_just_under_the_soft_limit(tmp_path):
    """The same climb, but what the job leaves behind keeps memory just under the soft
    limit (as a reclaim of a fragmented heap does): calling the restart off there would
    resume intake into the next crossing within moments (a field run then met the hard
    limit), so the drain goes on and the worker is stopped."""
    out = run_script(
        spike(
            """
        kept = []
        with w.job("spike", "s1"):
            held = climb()
            held.clear()
            while w.read().total < w.limits.soft - 3 * MB:  # stay 3 MiB under it
                kept.append(bytearray(MB))
                kept[-1][:: 4096] = b"x" * len(kept[-1][:: 4096])
        time.sleep(30)
        print("not stopped", ",".join(calls), flush=True)
        """
        ),
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["stopped"], out.stdout
    events = [r["event"] for r in journal(tmp_path)]
    assert "restart" in events and "restart_called_off" not in events, events
    assert "resume" not in events and "kill" not in events, events
