"""Kubernetes: exit for the kubelet, or the pod's eviction (or deletion) against a real local
HTTPS API server.

The fake API serves TLS with a self-signed certificate made for the test; the restarter
trusts it only through ``ca.crt`` in the service-account directory, as in a pod.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest

from fakeapi import FakeAPI, Fallback, Hook, Reply, Request, self_signed
from memwarden.config import Config
from memwarden.restart import make_restarter
from memwarden.restart.kubernetes import KubernetesExit, PodDeleter, budget_pause, checks
from platform_worker import run_worker

SA_TOKEN = "eyJhbGciOiJSUzI1NiJ9.CANARY-sa-token"
POD = "/api/v1/namespaces/jobs/pods/worker-7d9f-x2x"
#: What the API server answers when the budget allows no disruption (policy/v1).
BUDGET_SPENT = {
    "kind": "Status",
    "apiVersion": "v1",
    "status": "Failure",
    "message": "Cannot evict pod as it would violate the pod's disruption budget.",
    "reason": "TooManyRequests",
    "details": {"causes": [{"reason": "DisruptionBudget", "message": "needs 3 healthy"}]},
    "code": 429,
}


@pytest.fixture
def tls(tmp_path_factory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def api(tls):
    with FakeAPI(tls=tls) as server:
        yield server


@pytest.fixture
def sa_dir(tmp_path, tls) -> Path:
    d = tmp_path / "serviceaccount"
    d.mkdir()
    (d / "token").write_text(SA_TOKEN + "\n")
    (d / "namespace").write_text("jobs")
    (d / "ca.crt").write_bytes(tls[0].read_bytes())
    return d


def deleter(api: FakeAPI, sa_dir: Path, **kw: object) -> tuple[PodDeleter, Fallback]:
    fallback = Fallback("kubernetes")
    config = Config(
        restart="kubernetes",
        kubernetes_delete_pod=True,
        kubernetes_api_url=api.url,
        kubernetes_sa_dir=str(sa_dir),
        kubernetes_grace=20,
        api_timeout=2,
        **kw,  # type: ignore[arg-type]
    )
    return PodDeleter.from_env(config, {"HOSTNAME": "worker-7d9f-x2x"}, fallback), fallback


def test_default_is_exit_with_75():
    r = make_restarter(Config(restart="kubernetes"))
    assert isinstance(r, KubernetesExit) and r.code == 75 and r.name == "kubernetes"
    assert make_restarter(Config(restart="kubernetes", exit_code=3)).code == 3  # type: ignore[attr-defined]


def test_pod_deletion_is_a_delete_with_delete_options(api, sa_dir):
    api.script(Reply(200, {"kind": "Pod", "metadata": {"name": "worker-7d9f-x2x"}}))
    r, fallback = deleter(api, sa_dir, kubernetes_evict=False)
    r.restart("over soft limit")
    assert fallback.calls == []
    assert len(api.requests) == 1
    req = api.requests[0]
    assert req.method == "DELETE"
    assert req.path == POD
    assert req.headers["authorization"] == f"Bearer {SA_TOKEN}"
    assert req.headers["content-type"] == "application/json"
    assert req.json() == {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 20}


def test_downward_api_names_win(api, sa_dir):
    api.script(Reply(200))
    config = Config(
        kubernetes_delete_pod=True, kubernetes_api_url=api.url, kubernetes_sa_dir=str(sa_dir)
    )
    env = {"HOSTNAME": "short", "POD_NAME": "worker-abc", "POD_NAMESPACE": "prod"}
    PodDeleter.from_env(config, env, Fallback("kubernetes")).restart("over")
    assert api.requests[0].path == "/api/v1/namespaces/prod/pods/worker-abc/eviction"


def test_service_host_gives_the_api_url(sa_dir):
    config = Config(kubernetes_delete_pod=True, kubernetes_sa_dir=str(sa_dir))
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert (
        PodDeleter.from_env(config, env, Fallback("kubernetes")).api_url == "https://10.0.0.1:443"
    )


def test_server_errors_are_retried(api, sa_dir):
    api.script(500, 502, Reply(200))
    r, fallback = deleter(api, sa_dir, kubernetes_evict=False)
    r.restart("over")
    assert len(api.requests) == 3 and fallback.calls == []


@pytest.mark.parametrize(
    ("status", "says"),
    [(401, "token"), (403, "may not delete pods"), (404, "POD_NAME")],
)
def test_refusals_exit_instead_with_a_clear_error(api, sa_dir, caplog, status, says):
    api.script(Reply(status, {"kind": "Status", "reason": "Forbidden"}))
    r, fallback = deleter(api, sa_dir, kubernetes_evict=False)
    with caplog.at_level(logging.ERROR, logger="memwarden"):
        r.restart("over")
    assert len(api.requests) == 1
    assert fallback.calls == ["pod deletion failed"]
    assert any(f"HTTP {status}" in m and says in m for m in caplog.messages), caplog.messages
    assert SA_TOKEN not in caplog.text


def test_an_untrusted_certificate_is_refused(api, sa_dir, tmp_path):
    other, _ = self_signed(tmp_path)
    (sa_dir / "ca.crt").write_bytes(other.read_bytes())
    api.script(Reply(200))
    r, fallback = deleter(api, sa_dir, api_retries=0)
    r.restart("over")
    assert api.requests == []  # the TLS handshake failed before any request
    assert fallback.calls == ["pod deletion failed"]


# ------------------------------------------------------------------ the Eviction API
@pytest.mark.parametrize("status", [201, 200])
def test_eviction_is_a_post_of_a_policy_v1_eviction(api, sa_dir, status):
    api.script(Reply(status, {"kind": "Status", "apiVersion": "v1", "status": "Success"}))
    r, fallback = deleter(api, sa_dir)
    assert r.evict  # the default
    r.restart("over soft limit")
    assert fallback.calls == []
    assert len(api.requests) == 1
    req = api.requests[0]
    assert req.method == "POST"
    assert req.path == POD + "/eviction"
    assert req.headers["authorization"] == f"Bearer {SA_TOKEN}"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["accept"] == "application/json"
    assert req.json() == {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": "worker-7d9f-x2x", "namespace": "jobs"},
        "deleteOptions": {"gracePeriodSeconds": 20},
    }


def test_a_spent_budget_is_asked_again_until_it_allows(api, sa_dir, caplog):
    api.script(Reply(429, BUDGET_SPENT), Reply(429, BUDGET_SPENT), Reply(201))
    r, fallback = deleter(api, sa_dir)
    with caplog.at_level(logging.INFO, logger="memwarden"):
        r.restart("over")
    assert fallback.calls == []
    assert [q.method for q in api.requests] == ["POST"] * 3
    assert all(q.json() == api.requests[0].json() for q in api.requests)
    t = [q.t for q in api.requests]
    assert t[1] - t[0] >= 0.45 and t[2] - t[1] >= 0.95  # back-off 0.5 s, then 1 s
    assert sum("PodDisruptionBudget allows no disruption" in m for m in caplog.messages) == 2
    assert any("evicted (HTTP 201 after 3 tries" in m for m in caplog.messages)


def test_retry_after_is_honoured(api, sa_dir):
    api.script(Reply(429, BUDGET_SPENT, {"Retry-After": "1.5"}), Reply(201))
    r, fallback = deleter(api, sa_dir)
    r.restart("over")
    assert fallback.calls == [] and len(api.requests) == 2
    assert api.requests[1].t - api.requests[0].t >= 1.45  # not the 0.5 s back-off


def test_a_budget_spent_past_the_deadline_falls_back_to_exit(api, sa_dir, caplog):
    api.script(Reply(429, BUDGET_SPENT))
    r, fallback = deleter(api, sa_dir, shutdown_timeout=3)
    start = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="memwarden"):
        r.restart("over")
    took = time.monotonic() - start
    assert fallback.calls == ["pod deletion failed"]
    # Asked at 0, 0.5 and 1.5 s; the next try (2 s on) would pass the 3 s deadline.
    assert len(api.requests) == 3
    assert took < 3.0 + 1.0, took  # never past the deadline (+ a busy machine's slack)
    assert any("allowed no disruption" in m and "3 tries" in m for m in caplog.messages)
    assert SA_TOKEN not in caplog.text


def test_a_retry_after_past_the_deadline_falls_back_at_once(api, sa_dir):
    api.script(Reply(429, BUDGET_SPENT, {"Retry-After": "60"}), Reply(201))
    r, fallback = deleter(api, sa_dir, shutdown_timeout=10)
    start = time.monotonic()
    r.restart("over")
    assert len(api.requests) == 1 and fallback.calls == ["pod deletion failed"]
    assert time.monotonic() - start < 10


def test_eviction_rides_out_a_passing_server_error(api, sa_dir):
    api.script(503, Reply(429, BUDGET_SPENT), 502, Reply(201))
    r, fallback = deleter(api, sa_dir)
    r.restart("over")
    assert len(api.requests) == 4 and fallback.calls == []


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (401, "token"),
        (403, "pods/eviction"),
        (404, "POD_NAME"),
        (500, "more than one PodDisruptionBudget"),
    ],
)
def test_eviction_refusals_exit_at_once_with_a_clear_error(api, sa_dir, caplog, status, says):
    api.script(Reply(status, {"kind": "Status", "status": "Failure", "code": status}))
    r, fallback = deleter(api, sa_dir)
    with caplog.at_level(logging.ERROR, logger="memwarden"):
        r.restart("over")
    assert len(api.requests) == 1  # not retried
    assert fallback.calls == ["pod deletion failed"]
    assert any(f"HTTP {status}" in m and says in m for m in caplog.messages), caplog.messages
    assert SA_TOKEN not in caplog.text


def test_a_success_code_carrying_a_failure_status_is_no_eviction(api, sa_dir, caplog):
    two_budgets = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": "This pod has more than one PodDisruptionBudget, which the eviction "
        "subresource does not support.",
        "code": 500,
    }
    api.script(Reply(201, two_budgets))
    r, fallback = deleter(api, sa_dir)
    with caplog.at_level(logging.ERROR, logger="memwarden"):
        r.restart("over")
    assert fallback.calls == ["pod deletion failed"]
    assert any("more than one PodDisruptionBudget" in m for m in caplog.messages)


def test_budget_pause():
    assert [budget_pause(n, None) for n in (1, 2, 3, 4, 5, 9)] == [0.5, 1, 2, 4, 5, 5]
    assert budget_pause(1, "30") == 30.0  # the server's word, not capped
    assert budget_pause(2, "Wed, 21 Oct 2015 07:28:00 GMT") == 1.0  # a date: the back-off
    assert budget_pause(1, "-3") == 0.5 and budget_pause(1, "nan") == 0.5


def test_missing_pieces_are_named_by_check(tmp_path):
    config = Config(
        restart="kubernetes", kubernetes_delete_pod=True, kubernetes_sa_dir=str(tmp_path)
    )
    found = checks(config, {})
    text = "\n".join(found)
    assert "KUBERNETES_SERVICE_HOST" in text and "POD_NAMESPACE" in text
    assert "POD_NAME" in text and "token" in text
    assert checks(Config(restart="kubernetes"), {}) == []


@pytest.mark.slow
def test_a_real_worker_drains_then_exits_75_for_the_kubelet(tmp_path):
    proc, records = run_worker(tmp_path, {"MEMWARDEN_RESTART": "kubernetes"})
    assert proc.returncode == 75, proc.stderr[-3000:]
    events = [r["event"] for r in records]
    assert events.index("restart") < events.index("drain") < events.index("job")
    assert "sigterm" not in events


@pytest.mark.slow
def test_a_real_worker_drains_then_has_its_pod_evicted(api, sa_dir, tmp_path):
    def kubelet(request: Request) -> None:
        os.kill(int((tmp_path / "journal.jsonl.pid").read_text()), signal.SIGTERM)

    # The budget is spent at first; another worker comes back ready, then it allows one.
    api.script(Reply(429, BUDGET_SPENT), Hook(kubelet, Reply(201, {"kind": "Status"})))
    env = {
        "MEMWARDEN_RESTART": "kubernetes",
        "MEMWARDEN_KUBERNETES_DELETE_POD": "true",
        "MEMWARDEN_KUBERNETES_API_URL": api.url,
        "MEMWARDEN_KUBERNETES_SA_DIR": str(sa_dir),
        "POD_NAME": "worker-7d9f-x2x",
    }
    proc, records = run_worker(tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(api.requests) == 2
    req = api.requests[-1]
    assert req.method == "POST" and req.path == POD + "/eviction"
    assert req.json()["deleteOptions"]["gracePeriodSeconds"] == 30
    job = next(r for r in records if r["event"] == "job")
    assert job["ts"] <= api.requests[0].t  # the in-flight job finished before the eviction
    assert records[-1]["event"] == "sigterm"
    assert SA_TOKEN not in proc.stderr + proc.stdout
