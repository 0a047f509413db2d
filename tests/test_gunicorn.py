"""A real Gunicorn (sync, gthread, Uvicorn workers) in a real memory cgroup, one endpoint
leaking 1 MiB per request, real HTTP clients throughout: memwarden recycles the workers
that hold the memory, and not one request fails, nor does the kernel OOM-kill anything."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cgroups import memory_cgroup
from memwarden.records import problems

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench" / "apps"))

from web_load import Load, Sampler, free_port, gunicorn, summary  # noqa: E402

pytestmark = pytest.mark.slow
pytest.importorskip("gunicorn")

LIMIT = 320 * 2**20
SECONDS = 25.0
RECYCLES = 5


def journal(path: Path) -> list[dict[str, object]]:
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
    env = {
        "MEMWARDEN_JOURNAL": str(path),
        "MEMWARDEN_STATE_DIR": str(tmp_path / "state"),
        "LEAK_BYTES": str(2**20),
    }
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
    """``bench/gunicorn.py --tiny``: every contender runs and its last line adds up."""
    with memory_cgroup(64 * 2**20):
        pass  # cgroups writable here (else skipped)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gunicorn.py"), "--tiny"],
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
