"""Metrics: scrape a real worker process's endpoint (MEMWARDEN_METRICS_PORT)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request

import psutil
import pytest

from conftest import wait_for

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MB = 1024 * 1024

WORKER = """
import os, sys, time
from memwarden import Warden, workload
from memwarden.gauges.proc import self_rss

soft = self_rss() + 24 * 1024 * 1024
w = Warden(soft_limit=f"{soft}b", measure="process", restart="none", grace=0, min_uptime=0,
           shutdown_timeout=600, interval=0.2, state_dir=sys.argv[1], journal=sys.argv[2])
w.start()
for i in range(10):
    with w.job("send_email", f"e{i}"):
        sum(range(1000))
for i in range(5):
    with w.job("build_pdf", f"p{i}"):
        workload.leak(8)
print("soft", soft, flush=True)
while True:
    time.sleep(1)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def worker(tmp_path):
    port = free_port()
    env = {**os.environ, "MEMWARDEN_METRICS_PORT": str(port)}
    env.pop("MEMWARDEN_METRICS_ADDR", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(tmp_path / "state"), str(tmp_path / "j.jsonl")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_scrape_of_a_real_worker(worker):
    proc, port = worker
    soft = int(proc.stdout.readline().split()[1])

    def restarted():
        try:
            m = scrape(port)
        except OSError:
            return None
        return m if m.get(("memwarden_state", (("state", "restarting"),))) == 1.0 else None

    m = wait_for(restarted, timeout=60, what="the worker to report a restart")
    rss = psutil.Process(proc.pid).memory_info().rss

    def value(name, **labels):
        return m[(name, tuple(sorted(labels.items())))]

    # memory figures: what this very process is using, and the limit it was given
    assert abs(value("memwarden_rss_bytes") - rss) < 0.2 * rss
    assert 10 * MB < value("memwarden_memory_bytes") < 4096 * MB
    assert value("memwarden_memory_bytes") >= soft  # over the soft limit: that is why
    assert value("memwarden_soft_limit_bytes") == soft
    assert value("memwarden_hard_limit_bytes") == 0  # none set, no quota
    # jobs and their memory by kind
    assert value("memwarden_jobs_total", job="send_email") == 10
    assert value("memwarden_jobs_total", job="build_pdf") == 5
    assert value("memwarden_job_rss_delta_bytes_count", job="build_pdf") == 5
    assert value("memwarden_job_rss_growth_bytes_total", job="build_pdf") > 5 * 6 * MB
    assert value("memwarden_job_rss_delta_bytes_sum", job="send_email") < 2 * MB
    # the response: a reclaim first (a leak gives little back), then a restart
    assert value("memwarden_reclaims_total", reason="soft_limit") >= 1
    assert 0 <= value("memwarden_reclaimed_bytes_total") < 40 * MB
    assert value("memwarden_restarts_total", reason="soft_limit", action="none") == 1
    states = {
        dict(labels)["state"]: v for (name, labels), v in m.items() if name == "memwarden_state"
    }
    every = ("ok", "paused", "over_soft_limit", "over_hard_limit", "restarting", "killed", "off")
    assert states == {s: float(s == "restarting") for s in every}
    # served on loopback only (the default address)
    listening = [
        c.laddr
        for c in psutil.Process(proc.pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]
    assert [a.ip for a in listening] == ["127.0.0.1"]


def test_kinds_are_bounded_and_a_second_warden_takes_over():
    from memwarden import Journal, Warden
    from memwarden.metrics import MAX_KINDS, install

    registry = prometheus_client.CollectorRegistry()
    first = Warden(soft_limit="100GB", measure="process", journal=Journal(None))
    metrics = install(first, registry)
    for i in range(MAX_KINDS + 5):
        with first.job(f"kind{i}", i):
            pass
    assert registry.get_sample_value("memwarden_jobs_total", {"job": "other"}) == 5
    assert registry.get_sample_value("memwarden_jobs_total", {"job": "kind0"}) == 1
    second = Warden(soft_limit="200GB", measure="process", journal=Journal(None))
    assert install(second, registry) is metrics
    assert registry.get_sample_value("memwarden_soft_limit_bytes") == 200 * 10**9
    dry = {"event": "restart", "reason": "x over soft limit", "action": "none", "dry_run": True}
    metrics.sink(dry)
    labels = {"reason": "soft_limit", "action": "none"}
    assert registry.get_sample_value("memwarden_restarts_total", labels) is None


def test_kernel_oom_kills_and_intake_pauses_are_counted(tmp_path):
    """The journal's ``oom_kill`` and ``pause`` records reach their counters."""
    from memwarden import Journal, Warden
    from memwarden.metrics import install

    registry = prometheus_client.CollectorRegistry()
    w = Warden(
        soft_limit="100GB", measure="process", journal=Journal(None), state_dir=str(tmp_path)
    )
    metrics = install(w, registry)
    metrics.sink({"event": "oom_kill", "kills": 2})
    metrics.sink({"event": "pause"})
    assert registry.get_sample_value("memwarden_oom_kills_total") == 2
    assert registry.get_sample_value("memwarden_intake_pauses_total") == 1


def test_metrics_port_in_use_is_logged_not_raised(caplog):
    from memwarden import Journal, Warden

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        w = Warden(soft_limit="100GB", measure="process", journal=Journal(None), metrics_port=port)
        w.start()
        try:
            assert "metrics not served" in caplog.text
            with w.job("still_works", 1):
                pass
        finally:
            w.stop()
