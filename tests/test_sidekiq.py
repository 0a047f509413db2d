"""Sidekiq, a Ruby worker, guarded from outside by ``memwarden run``.

Debian's ``ruby-sidekiq`` (6.4) with real Redis (database 13, emptied before and after),
in a real memory cgroup, with memwarden's DEFAULT limits from the cgroup: 200 jobs that each
keep ~8 MB for good (``tests/apps/sidekiq/jobs.rb``), five at a time. ``--drain-signal TSTP``
quiets Sidekiq at the soft crossing (it fetches no more), the jobs in hand finish, then TERM
stops it and ``run`` starts it again. Sidekiq's basic fetch loses the jobs in hand when it is
SIGKILLed (by the kernel or by a hard limit): none may be.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cgroups import memory_cgroup
from conftest import IN_CI, need_service, wait_for

APP = Path(__file__).parent / "apps" / "sidekiq"
BENCH = Path(__file__).parent.parent / "bench" / "sidekiq.py"
MEMWARDEN = [sys.executable, "-c", "from memwarden.cli import main; main()"]
REDIS_URL = "redis://127.0.0.1:6379/13"
DONE = "mw:sidekiq:done"
QUEUE = "mw-test"
MiB = 1024 * 1024


@pytest.fixture
def db() -> Any:
    need_service("Redis", 6379)
    if shutil.which("sidekiq") is None:
        message = "sidekiq is not installed (apt-get install ruby-sidekiq)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    import redis

    conn = redis.Redis.from_url(REDIS_URL)
    conn.flushdb()
    yield conn
    conn.flushdb()
    conn.close()


def enqueue(conn: Any, jobs: int, mb: int = 8, poison_at: int | None = None) -> str | None:
    """``jobs`` KeepJobs as Sidekiq's client pushes them (LPUSH; Sidekiq pops the other end),
    the ``poison_at``-th of them a GrowJob instead (its jid returned)."""
    pipe = conn.pipeline()
    poison = None
    for number in range(jobs):
        now = time.time()
        job: dict[str, Any] = {"class": "KeepJob", "args": [number, mb]}
        if number == poison_at:
            job = {"class": "GrowJob", "args": []}
        job.update(jid=secrets.token_hex(12))
        job.update(queue=QUEUE, retry=True, created_at=now, enqueued_at=now)
        poison = job["jid"] if number == poison_at else poison
        pipe.lpush(f"queue:{QUEUE}", json.dumps(job))
    pipe.sadd("queues", QUEUE)
    pipe.execute()
    return poison


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_sidekiq_under_run_with_the_drain_signal_loses_no_job(db: Any, tmp_path: Path) -> None:
    jobs = 200
    enqueue(db, jobs)
    journal, log = tmp_path / "journal.jsonl", tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    env.pop("DYNO", None)
    env.update(REDIS_URL=REDIS_URL, MW_DONE=DONE)
    argv = [*MEMWARDEN, "run", "--journal", str(journal), "--drain-signal", "TSTP", "--"]
    argv += ["sidekiq", "-r", "./jobs.rb", "-c", "5", "-q", QUEUE, "-t", "20"]
    with memory_cgroup(512 * MiB) as dyno, open(log, "wb") as out:
        run = subprocess.Popen(
            argv, cwd=APP, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=dyno.join
        )
        try:
            wait_for(lambda: db.hlen(DONE) >= jobs, 300, interval=0.5, what=f"{jobs} jobs done")
            run.send_signal(signal.SIGTERM)
            assert run.wait(60) == 0
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(10)
        assert dyno.oom_kills() == 0, log.read_text()[-3000:]
    done = {int(k): int(v) for k, v in db.hgetall(DONE).items()}
    assert sorted(done) == list(range(jobs))
    assert set(done.values()) == {1}  # each ran once: a drained Sidekiq requeues nothing
    events = records(journal)
    restarts = [e for e in events if e["event"] == "restart"]
    drains = [e for e in events if e["event"] == "drain"]
    # 1.6 GB kept in a 512 MiB cgroup: several restarts, each one drained first, and none a
    # kill: every Sidekiq left on its TERM.
    assert len(restarts) >= 2 and len(drains) == len(restarts)
    assert {d["signal"] for d in drains} == {"SIGTSTP"}
    assert [e for e in events if e["event"] in ("kill", "oom_kill")] == []
    ended = [e for e in events if e["event"] == "exit" and e["why"] == "restart"]
    assert len(ended) == len(restarts) and {e["how"] for e in ended} == {"exited with status 0"}


@pytest.mark.slow
def test_the_jobs_in_hand_at_a_kill_come_back_and_the_poison_job_goes_to_the_dead_set(
    db: Any, tmp_path: Path
) -> None:
    # Sidekiq's basic fetch forgets the jobs of a killed process; memwarden's middleware
    # spools them in run's private directory and puts them back at the next start. A job that
    # grows without end is killed three times, then quarantined into Sidekiq's Dead set.
    jobs = 60
    poison = enqueue(db, jobs, mb=2, poison_at=10)
    journal, log = tmp_path / "journal.jsonl", tmp_path / "run.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    env.pop("DYNO", None)
    env.update(REDIS_URL=REDIS_URL, MW_DONE=DONE, MEMWARDEN_STATE_DIR=str(tmp_path / "state"))
    argv = [*MEMWARDEN, "run", "--journal", str(journal), "--drain-signal", "TSTP", "--"]
    argv += ["sidekiq", "-r", "./jobs.rb", "-c", "5", "-q", QUEUE, "-t", "20"]
    with memory_cgroup(384 * MiB) as dyno, open(log, "wb") as out:
        run = subprocess.Popen(
            argv, cwd=APP, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=dyno.join
        )
        try:
            wait_for(
                lambda: db.hlen(DONE) >= jobs - 1 and db.zcard("dead") == 1,
                300,
                interval=0.5,
                what="every KeepJob done and the GrowJob dead",
            )
            run.send_signal(signal.SIGTERM)
            assert run.wait(60) == 0
        finally:
            if run.poll() is None:
                run.kill()
                run.wait(10)
        assert dyno.oom_kills() == 0, log.read_text()[-3000:]
    done = {int(k): int(v) for k, v in db.hgetall(DONE).items()}
    assert sorted(done) == [n for n in range(jobs) if n != 10]
    assert set(done.values()) == {1}  # a job cut by a kill had not counted itself yet
    dead = [json.loads(m) for m in db.zrange("dead", 0, -1)]
    assert [(d["jid"], d["class"]) for d in dead] == [(poison, "GrowJob")]
    events = records(journal)
    kills = [e for e in events if e["event"] == "kill"]
    assert len(kills) == 3 and all(
        poison in {j["job_id"] for j in k["in_flight"]} for k in kills
    ), kills
    assert [e["job_id"] for e in events if e["event"] == "quarantine"] == [poison]
    assert [e["job_id"] for e in events if e["event"] == "skip"] == [poison]
    assert "put back job" in log.read_text()


@pytest.mark.slow
def test_bench_tiny_prints_one_line_per_contender(db: Any) -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--redis", REDIS_URL],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("contender=")]
    rows = {}
    for ln in lines:
        pairs = dict(part.split("=", 1) for part in ln.split())
        assert list(pairs)[:5] == ["contender", "jobs_per_s", "lost", "oom_kills", "restarts"]
        rows[pairs["contender"]] = pairs
    assert set(rows) == {"ps-after-each-job", "memwarden-run", "memwarden-run-no-drain"}
    guarded = rows["memwarden-run"]
    assert guarded["lost"] == "0" and guarded["oom_kills"] == "0"
    assert int(guarded["restarts"]) >= 1 and guarded["hard_kills"] == "0"
    assert float(guarded["jobs_per_s"]) > 0
    # No job raised, the ps-after-each-job middleware included (60 jobs: its process stays under).
    assert {row["failed"] for row in rows.values()} == {"0"}
    assert db.dbsize() == 0  # the bench emptied its database
