"""Come back on Kubernetes: exit after the drain (default), or have the pod deleted.

**Exit** (default): leave with ``MEMWARDEN_EXIT_CODE`` (75, EX_TEMPFAIL). The kubelet
restarts the container in place under ``restartPolicy: Always`` (Deployments) and
``OnFailure`` (Jobs) alike — a non-zero status is what ``OnFailure`` needs, where exit 0
would end a Job as "Completed". 75 is also told apart from an OOM kill (137, reason
``OOMKilled``) and from a plain SIGTERM stop (143) in ``lastState.terminated.exitCode``.
Repeated container restarts fall under the kubelet's CrashLoopBackOff back-off.

**Pod deletion** (``MEMWARDEN_KUBERNETES_DELETE_POD=true``): ``DELETE
/api/v1/namespaces/{ns}/pods/{name}`` with ``DeleteOptions`` (``gracePeriodSeconds``),
using the service account's token and CA (``MEMWARDEN_KUBERNETES_SA_DIR``, default the
standard mount). The ReplicaSet replaces the pod — a fresh pod, maybe on another node, and
no back-off. Needs RBAC ``delete`` on ``pods`` (see the README). If the deletion fails the
error says what to fix and the worker exits instead.
"""

from __future__ import annotations

import logging
import os
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING

from memwarden.restart import Restarter
from memwarden.restart.api import ApiError, Secret, call
from memwarden.restart.exit import ExitRestarter

if TYPE_CHECKING:
    from memwarden.config import Config

log = logging.getLogger("memwarden")


class PodDeleter:
    """Deletes this pod through the in-cluster API; falls back to ``fallback`` on failure."""

    name = "kubernetes"

    def __init__(
        self,
        *,
        api_url: str | None,
        sa_dir: str,
        namespace: str | None,
        pod: str | None,
        grace: float,
        timeout: float = 5.0,
        retries: int = 3,
        fallback: Restarter,
    ) -> None:
        self.api_url = api_url.rstrip("/") if api_url else None
        self.sa_dir = sa_dir
        self.namespace = namespace
        self.pod = pod
        self.grace = grace
        self.timeout = timeout
        self.retries = retries
        self.fallback = fallback

    @classmethod
    def from_env(cls, config: Config, env: Mapping[str, str], fallback: Restarter) -> PodDeleter:
        api = config.kubernetes_api_url
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not api and host:
            api = (
                f"https://[{host}]:{port or 443}"
                if ":" in host
                else f"https://{host}:{port or 443}"
            )
        return cls(
            api_url=api,
            sa_dir=config.kubernetes_sa_dir,
            namespace=env.get("POD_NAMESPACE") or _read(config.kubernetes_sa_dir, "namespace"),
            pod=env.get("POD_NAME") or env.get("HOSTNAME") or None,
            grace=config.kubernetes_grace,
            timeout=config.api_timeout,
            retries=config.api_retries,
            fallback=fallback,
        )

    def __repr__(self) -> str:
        return f"PodDeleter(api={self.api_url!r}, namespace={self.namespace!r}, pod={self.pod!r})"

    def problems(self) -> list[str]:
        found = []
        if not self.api_url:
            found.append(
                "no Kubernetes API: KUBERNETES_SERVICE_HOST is not set (not in a pod?); "
                "set MEMWARDEN_KUBERNETES_API_URL"
            )
        if not self.namespace:
            found.append(
                f"no namespace: {self.sa_dir}/namespace is missing; set POD_NAMESPACE "
                "from the downward API (fieldRef: metadata.namespace)"
            )
        if not self.pod:
            found.append(
                "no pod name: set POD_NAME from the downward API (fieldRef: metadata.name)"
            )
        if not _read(self.sa_dir, "token"):
            found.append(
                f"no service-account token in {self.sa_dir}/token: "
                "set automountServiceAccountToken: true"
            )
        return found

    @property
    def url(self) -> str:
        quote = urllib.parse.quote
        return (
            f"{self.api_url}/api/v1/namespaces/{quote(self.namespace or '', safe='')}"
            f"/pods/{quote(self.pod or '', safe='')}"
        )

    def restart(self, reason: str) -> None:
        problems = self.problems()
        if problems:
            for problem in problems:
                log.error("memwarden: pod deletion impossible: %s", problem)
            return self._fall_back()
        token = Secret(_read(self.sa_dir, "token") or "")
        ca = os.path.join(self.sa_dir, "ca.crt")
        sa = f"the service account of pod {self.pod}"
        try:
            answer = call(
                "DELETE",
                self.url,
                headers={
                    "Accept": "application/json",
                    "Authorization": f"Bearer {token.reveal()}",
                    "User-Agent": "memwarden",
                },
                json={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "gracePeriodSeconds": int(self.grace),
                },
                what=f"deletion of pod {self.namespace}/{self.pod}",
                refused={
                    401: f"the token in {self.sa_dir}/token was refused",
                    403: f"{sa} may not delete pods: grant the Role in the README "
                    "(verbs: [delete], resources: [pods])",
                    404: f"no pod {self.pod!r} in namespace {self.namespace!r}: "
                    "set POD_NAME/POD_NAMESPACE from the downward API",
                },
                timeout=self.timeout,
                retries=self.retries,
                verify=ssl.create_default_context(cafile=ca) if os.path.exists(ca) else True,
            )
        except ApiError as exc:
            log.error("memwarden: %s", exc)
            return self._fall_back()
        log.warning(
            "memwarden: pod %s/%s is being deleted (HTTP %d after %d tries, grace %gs): %s",
            self.namespace,
            self.pod,
            answer.status,
            answer.attempts,
            self.grace,
            reason,
        )

    def _fall_back(self) -> None:
        log.error("memwarden: restarting the local way instead (%s)", self.fallback.name)
        self.fallback.restart("pod deletion failed")


def _read(directory: str, name: str) -> str | None:
    try:
        with open(os.path.join(directory, name)) as f:
            return f.read().strip() or None
    except OSError:
        return None


class KubernetesExit(ExitRestarter):
    """The default: exit; the kubelet restarts the container."""

    name = "kubernetes"


def make(config: Config) -> Restarter:
    exit_ = KubernetesExit(config.exit_code)
    if not config.kubernetes_delete_pod:
        return exit_
    return PodDeleter.from_env(config, os.environ, exit_)


def checks(config: Config, env: Mapping[str, str]) -> list[str]:
    """``memwarden check``: what pod deletion still needs."""
    if config.restart != "kubernetes" or not config.kubernetes_delete_pod:
        return []
    return PodDeleter.from_env(config, env, KubernetesExit(config.exit_code)).problems()
