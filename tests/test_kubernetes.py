"""Kubernetes: exit for the kubelet, or pod deletion against a real local HTTPS API server.

The fake API serves TLS with a self-signed certificate made for the test; the restarter
trusts it only through ``ca.crt`` in the service-account directory, as in a pod.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest

from fakeapi import FakeAPI, Hook, Reply, Request, self_signed
from memwarden.config import Config
from memwarden.restart import make_restarter
from memwarden.restart.kubernetes import KubernetesExit, PodDeleter, checks
from platform_worker import run_worker

SA_TOKEN = "eyJhbGciOiJSUzI1NiJ9.CANARY-sa-token"


class Fallback:
    name = "kubernetes"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def restart(self, reason: str) -> None:
        self.calls.append(reason)


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
    fallback = Fallback()
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
    r, fallback = deleter(api, sa_dir)
    r.restart("over soft limit")
    assert fallback.calls == []
    assert len(api.requests) == 1
    req = api.requests[0]
    assert req.method == "DELETE"
    assert req.path == "/api/v1/namespaces/jobs/pods/worker-7d9f-x2x"
    assert req.headers["authorization"] == f"Bearer {SA_TOKEN}"
    assert req.headers["content-type"] == "application/json"
    assert req.json() == {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 20}


def test_downward_api_names_win(api, sa_dir):
    api.script(Reply(200))
    config = Config(
        kubernetes_delete_pod=True, kubernetes_api_url=api.url, kubernetes_sa_dir=str(sa_dir)
    )
    env = {"HOSTNAME": "short", "POD_NAME": "worker-abc", "POD_NAMESPACE": "prod"}
    PodDeleter.from_env(config, env, Fallback()).restart("over")
    assert api.requests[0].path == "/api/v1/namespaces/prod/pods/worker-abc"


def test_service_host_gives_the_api_url(sa_dir):
    config = Config(kubernetes_delete_pod=True, kubernetes_sa_dir=str(sa_dir))
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert PodDeleter.from_env(config, env, Fallback()).api_url == "https://10.0.0.1:443"


def test_server_errors_are_retried(api, sa_dir):
    api.script(500, 502, Reply(200))
    r, fallback = deleter(api, sa_dir)
    r.restart("over")
    assert len(api.requests) == 3 and fallback.calls == []


@pytest.mark.parametrize(
    ("status", "says"),
    [(401, "token"), (403, "may not delete pods"), (404, "POD_NAME")],
)
def test_refusals_exit_instead_with_a_clear_error(api, sa_dir, caplog, status, says):
    api.script(Reply(status, {"kind": "Status", "reason": "Forbidden"}))
    r, fallback = deleter(api, sa_dir)
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
def test_a_real_worker_drains_then_has_its_pod_deleted(api, sa_dir, tmp_path):
    def kubelet(request: Request) -> None:
        os.kill(int((tmp_path / "journal.jsonl.pid").read_text()), signal.SIGTERM)

    api.script(Hook(kubelet, Reply(200, {"kind": "Pod"})))
    env = {
        "MEMWARDEN_RESTART": "kubernetes",
        "MEMWARDEN_KUBERNETES_DELETE_POD": "true",
        "MEMWARDEN_KUBERNETES_API_URL": api.url,
        "MEMWARDEN_KUBERNETES_SA_DIR": str(sa_dir),
        "POD_NAME": "worker-7d9f-x2x",
    }
    proc, records = run_worker(tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(api.requests) == 1
    req = api.requests[0]
    assert req.path == "/api/v1/namespaces/jobs/pods/worker-7d9f-x2x"
    assert req.json()["gracePeriodSeconds"] == 30
    job = next(r for r in records if r["event"] == "job")
    assert job["ts"] <= req.t  # the in-flight job finished before the pod was deleted
    assert records[-1]["event"] == "sigterm"
    assert SA_TOKEN not in proc.stderr + proc.stdout
