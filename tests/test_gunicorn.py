"""A real Gunicorn (sync, gthread, Uvicorn workers) in a real memory cgroup, one endpoint
leaking 1 MiB per request, real HTTP clients throughout: memwarden recycles the workers
that hold the memory, and not one request fails, nor does the kernel OOM-kill anything."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from cgroups import memory_cgroup
from memwarden.gauges.proc import children_of
from memwarden.records import problems

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "apps"))

from web_load import Load, Sampler, free_port, gunicorn, summary, wait_serving  # noqa: E402

pytestmark = pytest.mark.slow
pytest.importorskip("gunicorn")

LIMIT = 320 * 2**20
SECONDS = 25.0
RECYCLES = 5


def settings(path: Path, tmp: Path, **more: str) -> dict[str, str]:
    """The guard's journal at ``path``, its state under ``tmp``, and ``more``."""
    return {"MEMWARDEN_JOURNAL": str(path), "MEMWARDEN_STATE_DIR": str(tmp / "state"), **more}


def kills(path: Path) -> list[dict[str, Any]]:
    return [r for r in journal(path) if r["event"] == "kill"]


def journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.parametrize(
    "worker_class", ["sync", "gthread", "uvicorn_worker.UvicornWorker"], ids=str.lower
)
def test_workers_recycled_on_memory_without_a_failed_request(
    worker_class: str, tmp_path: Path
) -> None:
    if "Uvicorn" in worker_class:
        pytest.importorskip("uvicorn_worker")
    path = tmp_path / "journal.jsonl"
    env = settings(path, tmp_path, LEAK_BYTES=str(2**20))
    port = free_port()
    extra = ["--threads", "2"] if worker_class == "gthread" else []
    with (
        memory_cgroup(LIMIT) as cg,
        gunicorn(cg.join, port, worker_class=worker_class, env=env, extra=extra) as arbiter,
    ):
        sampler = Sampler(cg.cgroup, arbiter.pid).start()
        load = Load(port, clients=4, pause=0.05).start()
        t0 = time.monotonic()
        # Until enough recycles, within a generous deadline (a busy machine serves slowly).
        while time.monotonic() - t0 < SECONDS * 4:
            recycles = [r for r in journal(path) if r.get("action") == "recycle"]
            if time.monotonic() - t0 >= SECONDS and len(recycles) >= RECYCLES:
                break
            time.sleep(0.5)
        load.stop()
        sampler.stop()
        figures = summary(load, sampler, time.monotonic() - t0)
        oom_kills = cg.oom_kills()
    records = journal(path)
    recycles = [r for r in records if r.get("action") == "recycle"]
    print(worker_class, figures, file=sys.stderr)
    assert load.failed == [], load.failed[:10]
    assert oom_kills == 0
    assert len(recycles) >= RECYCLES, figures
    assert sampler.restarts >= RECYCLES, figures
    assert figures["served"] > 100, figures
    assert not [r for r in records if r["event"] == "kill"], "a hard kill: the ladder was late"
    assert [r for r in records if r["event"] == "reclaim"], "no reclaim before the recycles"
    assert [p for r in records for p in problems(r)] == []


def test_bench_tiny() -> None:
    """``bench/gunicorn_recycling.py --tiny``: every contender runs and its last line adds up."""
    with memory_cgroup(64 * 2**20):
        pass  # cgroups writable here (else skipped)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gunicorn_recycling.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [
        {k: v for k, _, v in (part.partition("=") for part in line.split())}
        for line in out.stdout.splitlines()
        if line.startswith("contender=")
    ]
    assert [r["contender"] for r in rows] == ["none", "max-requests", "memwarden"]
    for r in rows:
        assert int(r["served"]) > 0 and float(r["p99_ms"]) > 0, r
        assert 0 < int(r["peak_bytes"]) <= 256 * 2**20, r
    assert int(rows[1]["max_requests"]) > 0
    guarded = rows[2]
    assert (guarded["lost"], guarded["oom_kills"]) == ("0", "0"), guarded


def test_one_worker_past_the_hard_limit_is_killed_before_the_kernel_does() -> None:
    """A request that takes a worker past the hard limit at once: that worker (the one with
    the most private memory) is SIGKILLed, the kernel kills nothing, the others serve on."""
    with tempfile.TemporaryDirectory(prefix="memwarden-test-") as tmp:
        path = Path(tmp) / "journal.jsonl"
        env = settings(
            path,
            Path(tmp),
            # 48 MiB between the hard limit and the cgroup's: room on both sides of the hog
            MEMWARDEN_SOFT_LIMIT="75%",
            MEMWARDEN_HARD_LIMIT="85%",
        )
        port = free_port()
        with memory_cgroup(LIMIT) as cg, gunicorn(cg.join, port, env=env) as arbiter:
            deadline = time.monotonic() + 60
            while len(children_of(arbiter.pid)) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            sampler = Sampler(cg.cgroup, arbiter.pid).start()
            # Past the hard limit, short of the cgroup's: the hard rung acts, not the kernel.
            hard = int(LIMIT * 0.85)
            hog = hard - cg.cgroup.working_set() + (LIMIT - hard) // 2
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request("GET", f"/hog?{hog}")
                conn.getresponse().read()  # cut short by the kill
            while time.monotonic() < deadline and not kills(path):
                time.sleep(0.2)
            # The others serve on, and the killed one is replaced.
            load = Load(port, clients=2, pause=0.05).start()
            while time.monotonic() < deadline and (sampler.restarts < 1 or len(load.done) < 20):
                time.sleep(0.2)
            load.stop()
            sampler.stop()
            oom_kills = cg.oom_kills()
        records = journal(path)
    killed = [r for r in records if r["event"] == "kill"]
    assert len(killed) == 1, records[-10:]
    assert killed[0]["target"] == "child" and killed[0]["uss"] >= hog // 2
    assert oom_kills == 0
    assert sampler.restarts >= 1
    assert load.failed == [] and len(load.done) >= 20
    assert [p for r in records for p in problems(r)] == []


def test_the_whole_server_only_when_recycling_cannot_help() -> None:
    """Memory no worker holds (a /dev/shm file charged to the cgroup): each worker is
    recycled once, then past the grace one SIGHUP (every worker replaced gracefully) — no
    more, no request failed."""
    with tempfile.TemporaryDirectory(prefix="memwarden-test-") as tmp:
        path = Path(tmp) / "journal.jsonl"
        shm = Path("/dev/shm") / f"memwarden-test-{os.getpid()}"
        env = settings(
            path,
            Path(tmp),
            MEMWARDEN_SOFT_LIMIT="50%",
            MEMWARDEN_HARD_LIMIT="95%",
            MEMWARDEN_GRACE="3s",
        )
        port = free_port()
        try:
            with memory_cgroup(LIMIT) as cg, gunicorn(cg.join, port, env=env) as arbiter:
                deadline = time.monotonic() + 90
                while len(children_of(arbiter.pid)) < 3 and time.monotonic() < deadline:
                    time.sleep(0.1)
                load = Load(port, clients=2, pause=0.05).start()
                first = set(children_of(arbiter.pid))
                while len(load.done) < 100 and time.monotonic() < deadline:
                    time.sleep(0.1)  # every worker warm: their memory as it will stay
                mib = (int(LIMIT * 0.5) - cg.cgroup.working_set()) // 2**20 + 60
                code = f"f = open({str(shm)!r}, 'wb')\nfor _ in range({mib}): f.write(b'x' * 2**20)"
                subprocess.run([sys.executable, "-c", code], preexec_fn=cg.join, check=True)
                while time.monotonic() < deadline and not hups(path):
                    time.sleep(0.2)
                # the HUP's new workers serving, and no second HUP meanwhile
                while time.monotonic() < deadline and set(children_of(arbiter.pid)) & first:
                    time.sleep(0.2)
                time.sleep(2)
                load.stop()
                oom_kills = cg.oom_kills()
        finally:
            shm.unlink(missing_ok=True)
        records = journal(path)
    recycled = [r["child_pid"] for r in records if r.get("action") == "recycle"]
    assert sorted(recycled) == sorted(first), records[-10:]  # each worker once
    assert [r["signal"] for r in records if r.get("action") == "signal"] == ["HUP"]
    assert not [r for r in records if r["event"] == "kill"] and oom_kills == 0
    assert load.failed == [] and len(load.done) > 20
    assert [p for r in records for p in problems(r)] == []


def hups(path: Path) -> list[dict[str, Any]]:
    return [r for r in journal(path) if r.get("signal") == "HUP"]


def test_a_uvicorn_worker_recycled_serves_the_connection_it_had_just_accepted() -> None:
    """The worker closes its listener and would close, unread, a connection it accepted a
    moment before (Uvicorn's own stop, uvicorn #2757): under the hooks that request is
    served — the one failed request in 4616 of a 60 s Uvicorn bench."""
    pytest.importorskip("uvicorn_worker")
    psutil = pytest.importorskip("psutil")
    port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix="memwarden-test-") as tmp,
        memory_cgroup(LIMIT) as cg,
        gunicorn(
            cg.join,
            port,
            worker_class="uvicorn_worker.UvicornWorker",
            workers=1,
            env={"MEMWARDEN_STATE_DIR": str(Path(tmp) / "state")},
        ) as arbiter,
    ):
        deadline = time.monotonic() + 60
        while not children_of(arbiter.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = psutil.Process(children_of(arbiter.pid)[0])

        def tcp(status: str) -> list[Any]:
            with contextlib.suppress(psutil.Error):
                return [c for c in worker.net_connections("tcp") if c.status == status]
            return []

        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            me = sock.getsockname()
            while time.monotonic() < deadline and not [
                c for c in tcp("ESTABLISHED") if tuple(c.raddr) == me
            ]:
                time.sleep(0.01)  # accepted by the worker, no request sent yet
            worker.send_signal(signal.SIGTERM)  # what a recycle sends
            while time.monotonic() < deadline and tcp("LISTEN"):
                time.sleep(0.01)  # its stop has begun: it listens no more
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            reply = b""
            with contextlib.suppress(OSError):
                reply = sock.recv(1024)
        assert reply.startswith(b"HTTP/1.1 200"), reply or "closed with no response"
        worker.wait(60)  # it left as asked (psutil raises TimeoutExpired else)
        wait_serving(port, arbiter)  # and a fresh worker serves


def test_a_dry_run_journals_the_ladder_and_touches_no_worker(tmp_path: Path) -> None:
    """``MEMWARDEN_DRY_RUN=1``, as a careful first week starts: the reclaim and the recycle
    of each worker are decided, journaled (``dry_run: true``) and logged ("DRY RUN: would"),
    and not one worker is signalled — the same workers serve throughout."""
    path, log = tmp_path / "journal.jsonl", tmp_path / "gunicorn.log"
    env = settings(
        path,
        tmp_path,
        MEMWARDEN_DRY_RUN="1",
        MEMWARDEN_SOFT_LIMIT="40%",
        LEAK_BYTES=str(2**20),
    )
    port = free_port()
    with (
        memory_cgroup(LIMIT) as cg,
        gunicorn(cg.join, port, env=env, log=str(log)) as arbiter,
    ):
        deadline = time.monotonic() + 90
        while len(children_of(arbiter.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        first = set(children_of(arbiter.pid))
        load = Load(port, clients=4, pause=0.05).start()
        while time.monotonic() < deadline and len(
            {r["child_pid"] for r in journal(path) if r.get("action") == "recycle"}
        ) < len(first):
            time.sleep(0.2)
        load.stop()
        still = set(children_of(arbiter.pid))
        oom_kills = cg.oom_kills()
    records = journal(path)
    recycled = {r["child_pid"] for r in records if r.get("action") == "recycle"}
    assert recycled == first, records[-10:]  # each worker, as a real run would
    assert [r for r in records if r["event"] == "reclaim"], "no reclaim decided first"
    assert all(r.get("dry_run") is True for r in records if r["event"] != "oom_kill"), records
    assert still == first  # nobody was signalled
    assert oom_kills == 0 and load.failed == []
    assert "DRY RUN: would recycle worker" in log.read_text()
    assert [p for r in records for p in problems(r)] == []


@pytest.mark.parametrize("workers", [1, 2], ids=["single-process", "uvicorn-workers-2"])
def test_uvicorn_alone_under_memwarden_run_is_stopped_gracefully_and_started_again(
    workers: int, tmp_path: Path
) -> None:
    """``memwarden run -- uvicorn app --workers N`` (docs/gunicorn.md, "Uvicorn alone"): past
    the soft limit the whole server gets SIGTERM, Uvicorn's graceful stop (status 0, no
    SIGKILL), and is started again and serves; the kernel kills nothing."""
    pytest.importorskip("uvicorn")
    path = tmp_path / "journal.jsonl"
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "gunicorn_app:asgi", "--port", str(port)]
    cmd += ["--app-dir", str(ROOT / "bench" / "apps"), "--workers", str(workers)]
    run = [sys.executable, "-m", "memwarden.cli", "run", "--journal", str(path)]
    run += ["--soft-limit", "50%", "--grace", "0", "--min-uptime", "2", "--", *cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMWARDEN_")}
    env.update(MEMWARDEN_STATE_DIR=str(tmp_path / "state"), LEAK_BYTES=str(2**20))
    with memory_cgroup(256 * 2**20) as cg, open(tmp_path / "run.log", "wb") as out:
        proc = subprocess.Popen(run, preexec_fn=cg.join, env=env, stdout=out, stderr=out)
        try:
            wait_serving(port, proc)
            load = Load(port, clients=2, pause=0.05).start()
            deadline = time.monotonic() + 120
            while (
                time.monotonic() < deadline
                and len([r for r in journal(path) if r["event"] == "start"]) < 2
            ):
                time.sleep(0.2)
            load.stop()
            wait_serving(port, proc)  # the new server serves
        finally:
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(60)
        oom_kills = cg.oom_kills()
    records = journal(path)
    log = (tmp_path / "run.log").read_text(errors="replace")
    restarts = [r for r in records if r["event"] == "restart"]
    # over the soft limit, or rising toward it fast: the soft rungs, never the hard one
    assert restarts and restarts[0]["cause"] in ("over_soft_limit", "growth"), log[-2000:]
    exits = [r for r in records if r["event"] == "exit"]
    # Uvicorn's own graceful stop: its server finished, then (single process) it re-raises
    # the SIGTERM it caught, status 143; its supervisor (--workers) exits 0
    assert exits[0]["status"] in (0, 128 + signal.SIGTERM), exits
    assert "Finished server process" in log
    assert not [r for r in records if r["event"] == "kill"] and oom_kills == 0
    assert status == exits[-1]["status"] and len(load.done) > 20  # run exits as Uvicorn did
    assert [p for r in records for p in problems(r)] == []


def test_a_conf_with_its_own_when_ready_keeps_the_guard_and_gunicorns_log(
    tmp_path: Path,
) -> None:
    """The docs' snippet, then the user's own ``when_ready`` (it replaces ours): the watchdog
    starts anyway (from ``pre_fork``) and recycles; memwarden's lines go to gunicorn's
    ``--error-logfile`` (not bare on stderr), the start line included."""
    conf, errors = tmp_path / "gunicorn.conf.py", tmp_path / "error.log"
    conf.write_text(
        "from memwarden.gunicorn import hooks\n\nglobals().update(hooks())\n\n\n"
        'def when_ready(server):\n    server.log.info("the user\'s own when_ready")\n'
    )
    path = tmp_path / "journal.jsonl"
    env = settings(path, tmp_path, LEAK_BYTES=str(2**20))
    port = free_port()
    extra = ["-c", str(conf), "--error-logfile", str(errors)]
    with (
        memory_cgroup(LIMIT) as cg,
        gunicorn(cg.join, port, guard=False, extra=extra, env=env, log=str(tmp_path / "out")),
    ):
        load = Load(port, clients=4, pause=0.05).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not [
            r for r in journal(path) if r.get("action") == "recycle"
        ]:
            time.sleep(0.2)
        load.stop()
        oom_kills = cg.oom_kills()
    text = errors.read_text()
    assert "the user's own when_ready" in text  # theirs ran
    assert [r for r in journal(path) if r.get("action") == "recycle"], text[-2000:]
    assert "memwarden: gunicorn workers recycled over" in text  # the start line, in their log
    assert "memwarden: recycle worker" in text
    assert "memwarden" not in (tmp_path / "out").read_text()  # nothing bare on stderr
    assert oom_kills == 0 and load.failed == []


def test_a_bad_setting_stops_gunicorn_at_start_naming_it_without_a_traceback() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "bench/apps/gunicorn_conf.py"),
         "--chdir", str(ROOT / "bench/apps"), "--bind", f"127.0.0.1:{free_port()}",
         "gunicorn_app:app"],
        env={**os.environ, "MEMWARDEN_SOFT_LIMIT": "lots"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0
    assert "MEMWARDEN_SOFT_LIMIT" in out.stderr and "512MB" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_a_preloaded_big_app_is_recycled_without_copying_its_shared_pages(
    tmp_path: Path,
) -> None:
    """``--preload`` with a million small objects made at import, shared copy-on-write by
    the arbiter and its workers: a collection that walks them copies them (about 130 MiB a
    process). The arbiter freezes its objects before each fork, so neither its reclaim nor
    the workers' copies them: recycles, and no hard kill, no OOM kill, no failed request
    (before: the first reclaim took memory past the cgroup's limit, 19 OOM kills in 30 s)."""
    path = tmp_path / "journal.jsonl"
    env = settings(
        path,
        tmp_path,
        LEAK_BYTES=str(2**20),
        BIG_OBJECTS=str(10**6),
    )
    port = free_port()
    with (
        memory_cgroup(512 * 2**20) as cg,
        gunicorn(cg.join, port, extra=["--preload"], env=env),
    ):
        load = Load(port, clients=4, pause=0.05).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (
            len([r for r in journal(path) if r.get("action") == "recycle"]) < 4
        ):
            time.sleep(0.2)
        load.stop()
        oom_kills = cg.oom_kills()
    records = journal(path)
    assert len([r for r in records if r.get("action") == "recycle"]) >= 4, records[-10:]
    assert not [r for r in records if r["event"] == "kill"], records[-10:]
    assert oom_kills == 0 and load.failed == [], load.failed[:5]
