"""Celery under memwarden, end to end: real ``celery worker`` processes in a real memory
cgroup (the "dyno"), real Redis and RabbitMQ brokers, tasks that really grow memory.

Each test runs the worker under a tiny supervisor (the dyno manager's part: start it again
when it exits) and counts every finished task id in Redis, so "no task lost" is checked,
not assumed. The quota is the cgroup's limit, detected by the warden itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult
from tests.cgroups import TestCgroup, memory_cgroup
from tests.conftest import need_service, wait_for
from tests.fakeapi import FakeAPI, Reply

from memwarden.records import problems

APPS = Path(__file__).parent / "apps"
RESULTS = "redis://127.0.0.1:6379/1"  # Celery's Redis DB in this project's tests
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
MB = 1024 * 1024
QUOTA = 384 * MB  # the "dyno": soft limit 60% = 230 MiB, hard limit 88% = 338 MiB


class Supervised:
    """``celery worker`` in the cgroup, started again whenever it exits."""

    def __init__(self, argv: list[str], env: dict[str, str], cg: TestCgroup, log: Path) -> None:
        self.argv, self.env, self.cg, self.log = argv, env, cg, log
        self.starts: list[int] = []
        self.exits: list[tuple[int, int]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Supervised:
        self._thread.start()
        wait_for(lambda: self.ready() >= 1, 60, 0.1, "the first worker to be ready")
        return self

    def ready(self) -> int:
        """How many worker lifetimes have said "ready" so far."""
        try:
            return self.log.read_text(errors="replace").count(" ready.")
        except OSError:
            return 0

    def _run(self) -> None:
        with open(self.log, "ab") as out:
            while not self._stop.is_set() and len(self.starts) < 40:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self.proc = subprocess.Popen(
                        [sys.executable, "-m", "celery", "-A", "celery_jobs", *self.argv],
                        cwd=APPS,
                        env=self.env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        preexec_fn=self.cg.join,
                    )
                    self.starts.append(self.proc.pid)
                code = self.proc.wait()
                self.exits.append((self.proc.pid, code))
                self.cg.kill_all()  # pool children of a killed worker die with it

    def __exit__(self, *exc: Any) -> None:
        with self._lock:
            self._stop.set()
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGQUIT)  # cold shutdown: messages go back
        self._thread.join(30)
        self.cg.kill_all()


class Run:
    """One test's worker settings, producer, journal and completion marks."""

    def __init__(
        self,
        tmp: Path,
        broker: str,
        pool: str,
        quota: int = QUOTA,
        concurrency: int = 2,
        defaults: bool = False,
        **env: str,
    ) -> None:
        """``defaults``: memwarden's default settings (only the journal and state dir, and
        what ``env`` names); else the quick settings of these tests."""
        self.tmp, self.broker, self.pool = tmp, broker, pool
        self.quota, self.concurrency = quota, concurrency
        self.name = f"mw-celery-{uuid.uuid4().hex[:10]}"
        self.queue = self.name
        tmp.mkdir(parents=True, exist_ok=True)
        self.journal = tmp / "journal.jsonl"
        self.log = tmp / "worker.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
        self.env.update(
            PYTHONPATH=os.pathsep.join([str(APPS.parent.parent / "src"), str(APPS)]),
            MWT_BROKER=broker,
            MWT_QUEUE=self.queue,
            MWT_RUN=self.name,
            MEMWARDEN_JOURNAL=str(self.journal),
            MEMWARDEN_STATE_DIR=str(tmp / "state"),
            MEMWARDEN_SOFT_LIMIT="60%",
            MEMWARDEN_HARD_LIMIT="88%",
            MEMWARDEN_INTERVAL="0.1",
            MEMWARDEN_GRACE="1" if pool == "prefork" else "0",  # prefork: recycle first
            MEMWARDEN_MIN_UPTIME="0",
            MEMWARDEN_MAX_RESTARTS="1000",
            MEMWARDEN_SHUTDOWN_TIMEOUT="20",
            MEMWARDEN_POISON_KILLS="2",
            MEMWARDEN_RESTART="signal" if pool == "prefork" else "exit",
            MWT_PREFETCH="1" if pool == "prefork" else "4",
        )
        if defaults:
            for key in [k for k in self.env if k.startswith("MEMWARDEN_")]:
                if key not in ("MEMWARDEN_JOURNAL", "MEMWARDEN_STATE_DIR"):
                    del self.env[key]
            self.env["MWT_PREFETCH"] = "4"  # Celery's default
        self.env.update(env)
        self.app = Celery("producer", broker=broker, backend=RESULTS)
        self.app.conf.broker_transport_options = {"visibility_timeout": 4}
        self.marks = redis.Redis.from_url(RESULTS)
        self.sent: list[str] = []

    def worker_argv(self) -> list[str]:
        return [
            "worker",
            "-P",
            self.pool,
            "-c",
            str(self.concurrency),
            "-Q",
            self.queue,
            "-n",
            f"{self.name}@%h",
            "-l",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]

    @contextlib.contextmanager
    def worker(self) -> Iterator[tuple[Supervised, TestCgroup]]:
        with (
            memory_cgroup(self.quota) as cg,
            Supervised(self.worker_argv(), self.env, cg, self.log) as sup,
        ):
            yield sup, cg

    def wait(self, condition: Any, timeout: float, what: str) -> None:
        """``wait_for`` that shows the worker's log and the journal's last records on a
        timeout (a failure on a busy CI machine is then read, not guessed)."""
        try:
            wait_for(condition, timeout, 0.2, what)
        except AssertionError:
            print(self.log.read_text(errors="replace")[-8000:] if self.log.exists() else "")
            print("\n".join(json.dumps(r) for r in self.records()[-40:]))
            raise

    def send(self, name: str, *args: Any) -> str:
        task_id = self.app.send_task(name, args=args, queue=self.queue).id
        self.sent.append(task_id)
        return task_id

    def done(self) -> set[str]:
        return {m.decode() for m in self.marks.smembers(f"{self.name}:done")}

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.journal.exists():
            return []
        out = []
        for line in self.journal.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if event is None or record.get("event") == event:
                    out.append(record)
        return out

    def queued(self) -> tuple[int, int]:
        """(messages ready in the broker's queue, consumers) — Redis knows no consumers: -1."""
        if self.broker.startswith("redis"):
            return int(self.marks.llen(self.queue)), -1
        with self.app.connection_for_write() as conn:
            ok = conn.default_channel.queue_declare(self.queue, passive=True)
            return int(ok.message_count), int(ok.consumer_count)

    def unacked(self) -> list[str]:
        """Ids of this run's tasks held unacknowledged by some worker (Redis broker)."""
        held = []
        for _, raw in self.marks.hscan_iter("unacked"):
            if self.queue.encode() in raw:
                held.append(json.loads(raw)[0]["headers"]["id"])
        return held

    def cleanup(self) -> None:
        for key in self.marks.scan_iter(f"{self.name}*"):
            self.marks.delete(key)
        for task_id in self.sent:
            self.marks.delete(f"celery-task-meta-{task_id}", f"memwarden:kills:{task_id}")
        with contextlib.suppress(Exception), self.app.connection_for_write() as conn:
            from kombu import Queue

            Queue(self.queue).bind(conn.default_channel).delete()
        if self.broker.startswith("redis"):
            self.marks.delete(self.queue, f"_kombu.binding.{self.queue}")
            for tag, raw in self.marks.hscan_iter("unacked"):  # held by the last worker
                if self.queue.encode() in raw:
                    self.marks.hdel("unacked", tag)
                    self.marks.zrem("unacked_index", tag)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> str:
    need_service("Redis", 6379)
    if request.param == "rabbitmq":
        need_service("RabbitMQ", 5672)
        return AMQP
    return RESULTS


@pytest.fixture
def run_factory(tmp_path: Path) -> Iterator[Any]:
    runs: list[Run] = []

    def make(broker: str, pool: str, **kwargs: Any) -> Run:
        runs.append(Run(tmp_path / str(len(runs)), broker, pool, **kwargs))
        return runs[-1]

    yield make
    for run in runs:
        run.cleanup()


JOBS = 200
LEAK_EVERY, LEAK_MB = 5, 16  # 40 of the 200 jobs keep 16 MiB each: 640 MiB of real growth
FRAGMENT_EVERY, FRAGMENT_MB = 10, 24  # 20 leave glibc fragmentation (reclaimable)
HOG_MB = 480  # past the 338 MiB hard limit, step by step: the watchdog must catch it
HOG_STEP_MB, HOG_PAUSE = 8, 0.15  # ~50 MiB/s: the 46 MiB from hard limit to quota is ~0.9 s


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_growing_jobs_none_lost_hog_caught_poison_quarantined(
    run_factory: Any, broker: str, pool: str
) -> None:
    run: Run = run_factory(broker, pool)
    with run.worker() as (sup, cg):
        # 1. 200 jobs, some really growing: the worker crosses its limits again and again.
        batch = []
        for n in range(JOBS):
            if n % LEAK_EVERY == 0:
                batch.append(run.send("mwt.work", "leak", LEAK_MB))
            elif n % FRAGMENT_EVERY == 1:
                batch.append(run.send("mwt.work", "fragment", FRAGMENT_MB))
            else:
                batch.append(run.send("mwt.work"))
        run.wait(lambda: set(batch) <= run.done(), 120, "the 200 jobs to complete")
        # A record from every job: written at the task's end, a moment after its own mark.
        recorded = lambda: {r["job_id"] for r in run.records("job")} >= set(batch)  # noqa: E731
        run.wait(recorded, 60, "a record from every job")
        restarts, jobs = run.records("restart"), run.records("job")
        assert all(r["job"] == "mwt.work" and r["framework"] == "celery" for r in jobs)
        if pool == "prefork":
            # Children over their share recycled after their task (the worker serves on)...
            recycles = [r for r in restarts if r["pid"] not in sup.starts]
            assert len(recycles) >= 3 and {r["action"] for r in recycles} == {"recycle"}
            for r in recycles:  # ...decided at a task's end, and no task ran there after
                # (a reclaim the worker asks for runs beside a task, or while the child is
                # idle, and leaves the decision to that end: billiard acts only there).
                later = [j for j in jobs if j["pid"] == r["pid"] and j["ts"] > r["ts"]]
                assert not later, later
            assert len({j["pid"] for j in jobs}) >= 3  # fresh children forked, serving
            # Over the soft limit the worker asked its children to trim, and they did,
            # beside their running tasks.
            reclaims = run.records("reclaim")
            assert any(r.get("children_asked", 0) >= 1 for r in reclaims), reclaims
            asked = [r for r in reclaims if r["reason"].startswith("asked by the worker")]
            assert asked and all(r["pid"] not in sup.starts for r in asked)
        else:
            # The process itself grew: drained and restarted, again and again.
            assert len([r for r in restarts if r["action"] == "exit"]) >= 2, restarts
            assert len(sup.starts) >= 3 and 75 in {code for _, code in sup.exits}
        assert any(r["freed"] > 0 for r in run.records("reclaim"))  # fragmentation given back
        assert not run.records("kill") and "WorkerLostError" not in run.log.read_text()

        # 2. A job that grows past the hard limit mid-run: killed, back, done on a fresh worker
        # (prefork: its pool child alone is killed).
        hog = run.send("mwt.grow", HOG_MB, 16, HOG_STEP_MB, HOG_PAUSE)
        run.wait(lambda: hog in run.done(), 90, "the hog to come back and complete")
        key = f"{run.name}:grow:{hog}"
        assert int(run.marks.get(f"{key}:attempts") or 0) == 2
        finished = run.marks.hgetall(f"{key}:finished")
        assert b"1" not in finished and b"2" in finished  # caught before it finished
        kills = run.records("kill")
        assert len(kills) == 1 and hog in {j["job_id"] for j in kills[0]["in_flight"]}
        started = run.marks.hgetall(f"{key}:started")
        assert started[b"1"] != finished[b"2"]  # a fresh worker ran it to the end
        if pool == "prefork":  # only the hog's pool child died
            assert kills[0]["target"] == "child"
            assert kills[0]["in_flight"] == [{"job": "mwt.grow", "job_id": hog}]
            assert kills[0]["child_pid"] == int(started[b"1"].split(b":")[0])
        else:
            assert "target" not in kills[0]

        # 3. A poison job: killed twice, then quarantined; the queue behind it carries on.
        poison = run.send("mwt.poison", HOG_MB, HOG_STEP_MB, HOG_PAUSE)
        behind = [run.send("mwt.work") for _ in range(10)]
        result = AsyncResult(poison, app=run.app)
        run.wait(lambda: result.state == "FAILURE", 120, "the poison job to be failed")
        run.wait(lambda: set(behind) <= run.done(), 180, "the jobs behind it")
        assert poison not in run.done()
        assert int(run.marks.get(f"{run.name}:poison:{poison}:runs") or 0) == 2
        assert "memwarden" in str(result.result) and "2 hard kills" in str(result.result)
        quarantined = run.records("quarantine")
        assert [(q["job"], q["job_id"], q["kills"]) for q in quarantined] == [
            ("mwt.poison", poison, 2)
        ]
        assert len(run.records("kill")) == 3
        assert [p for r in run.records() for p in problems(r)] == []  # the journal's schema
        assert set(run.sent) - {poison} <= run.done()  # no job lost
        assert cg.oom_kills() == 0  # memwarden acted before the kernel had to


@pytest.mark.slow
def test_drain_past_the_shutdown_timeout_ends_in_a_kill_and_the_task_comes_back(
    run_factory: Any,
) -> None:
    """Over the soft limit with a task that will not finish in time: the warm shutdown waits
    ``shutdown_timeout``, then cold stop and kill; the task comes back and completes."""
    need_service("Redis", 6379)
    run: Run = run_factory(RESULTS, "prefork", MEMWARDEN_SHUTDOWN_TIMEOUT="0.5")
    with run.worker() as (sup, cg):
        slow = run.send("mwt.grow", 200, 8, 8, 0.02, 6.0)  # over soft, then holds 6 s
        run.wait(lambda: slow in run.done(), 60, "the slow task to come back and finish")
        key = f"{run.name}:grow:{slow}"
        assert int(run.marks.get(f"{key}:attempts") or 0) == 2
        assert b"1" not in run.marks.hgetall(f"{key}:finished")  # the first run was cut
        restarts, kills = run.records("restart"), run.records("kill")
        # The main process: its largest child asked to recycle (it is busy), then the drain.
        assert [r["action"] for r in restarts if r["pid"] in sup.starts] == ["recycle", "signal"]
        assert len(kills) == 1 and kills[0]["reason"].startswith("still running 0.5s")
        assert [j["job_id"] for j in kills[0]["in_flight"]] == [slow]
        assert len(sup.starts) == 2 and cg.oom_kills() == 0


@pytest.mark.slow
def test_solo_pool_restarts_and_warns_about_unsafe_settings(run_factory: Any) -> None:
    """The solo pool runs tasks in the worker itself; with Celery's default (unsafe)
    settings the guard says loudly, at start, which ones lose jobs."""
    need_service("Redis", 6379)
    run: Run = run_factory(RESULTS, "solo", MWT_UNSAFE="1", MEMWARDEN_RESTART="signal")
    with run.worker() as (sup, _):
        batch = [run.send("mwt.work", "leak", LEAK_MB) for _ in range(30)]
        run.wait(lambda: set(batch) <= run.done(), 60, "the 30 jobs to complete")
        recorded = lambda: {j["job_id"] for j in run.records("job")} >= set(batch)  # noqa: E731
        run.wait(recorded, 60, "a record from every job (a moment after its mark)")
        assert len(sup.starts) >= 2  # 480 MiB of leaks: drained and restarted
    log = run.log.read_text()
    assert "JOBS CAN BE LOST: task_acks_late is off" in log
    assert "JOBS CAN BE LOST: task_reject_on_worker_lost is off" in log
    restarts = run.records("restart")
    assert restarts and {r["action"] for r in restarts} == {"signal"}
    assert {j["job_id"] for j in run.records("job")} >= set(batch)


@pytest.mark.slow
def test_heroku_restart_runs_once_per_drain_and_keeps_the_token_secret(run_factory: Any) -> None:
    """``MEMWARDEN_RESTART=heroku``: after each warm shutdown the Platform API is asked,
    exactly once, to restart the dyno (a real local HTTP server stands in for Heroku)."""
    need_service("Redis", 6379)
    token = f"canary-{uuid.uuid4().hex}"
    with FakeAPI() as api:
        api.script(Reply(202, {}))
        run: Run = run_factory(
            RESULTS,
            "threads",
            MEMWARDEN_RESTART="heroku",
            MEMWARDEN_HEROKU_API_URL=api.url,
            HEROKU_APP_NAME="mwt-app",
            DYNO="worker.1",
            HEROKU_API_TOKEN=token,
            # Prefetched tasks still run in a warm shutdown: with 4 per thread they could
            # leak the drain past the hard limit, and a kill makes no API call.
            MWT_PREFETCH="1",
        )
        with run.worker() as (sup, _):
            batch = [run.send("mwt.work", "leak", LEAK_MB) for _ in range(30)]
            run.wait(lambda: set(batch) <= run.done(), 90, "the 30 jobs to complete")

            def drains() -> list[dict[str, Any]]:
                # read afresh: the last jobs may finish before the drain they cause is recorded
                return [r for r in run.records("restart") if r["action"] == "heroku"]

            wait_for(lambda: len(api.requests) >= len(drains()) >= 1, 60, 0.1, "the API calls")
            wait_for(lambda: len(sup.starts) > len(drains()), 30, 0.1, "each drain to end it")
        assert len(api.requests) == len(drains())  # once per drain, though two paths may call
        for req in api.requests:
            assert (req.method, req.path) == ("DELETE", "/apps/mwt-app/dynos/worker.1")
            assert req.headers["accept"] == "application/vnd.heroku+json; version=3"
            assert req.headers["authorization"] == f"Bearer {token}"
    assert token not in run.log.read_text() and token not in run.journal.read_text()
