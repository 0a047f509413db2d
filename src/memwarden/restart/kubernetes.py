"""Come back on Kubernetes: exit after the drain (default), or have the pod replaced.

**Exit** (default): leave with ``MEMWARDEN_EXIT_CODE`` (75, EX_TEMPFAIL). The kubelet
restarts the container in place under ``restartPolicy: Always`` (Deployments) and
``OnFailure`` (Jobs) alike — a non-zero status is what ``OnFailure`` needs, where exit 0
would end a Job as "Completed". 75 is also told apart from an OOM kill (137, reason
``OOMKilled``) and from a plain SIGTERM stop (143) in ``lastState.terminated.exitCode``.
Repeated container restarts fall under the kubelet's CrashLoopBackOff back-off.

**A new pod** (``MEMWARDEN_KUBERNETES_DELETE_POD=true``): through the **Eviction API**
(default): ``POST /api/v1/namespaces/{ns}/pods/{name}/eviction`` with a ``policy/v1``
``Eviction`` (``deleteOptions.gracePeriodSeconds``), so the pod's PodDisruptionBudget decides
how many workers of the whole fleet restart at once. A 429 (the budget allows no disruption
now, or the API server's rate limit) is asked again — after the server's Retry-After, else
0.5, 1, 2, 4, 5, 5… s — until the shutdown timeout; then the worker exits instead, and the
kubelet restarts its container in place. ``MEMWARDEN_KUBERNETES_EVICT=false``: a plain
``DELETE`` of the pod with ``DeleteOptions``, which no budget holds back. Either uses the
service account's token and CA (``MEMWARDEN_KUBERNETES_SA_DIR``, default the standard
mount) and needs RBAC (``create`` on ``pods/eviction``, or ``delete`` on ``pods``: see
docs/kubernetes.md). The ReplicaSet replaces the pod — a fresh pod, maybe on another node,
and no back-off. Any failure says what to fix and the worker exits instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import time
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from memwarden import redact
from memwarden.restart import Restarter
from memwarden.restart.api import Answer, ApiError, Secret, backoff, call
from memwarden.restart.exit import ExitRestarter

if TYPE_CHECKING:
    from memwarden.config import Config

log = logging.getLogger("memwarden")


#: The eviction's whole deadline (s) when none is given (the default shutdown timeout).
EVICTION_DEADLINE = 25.0


class PodDeleter:
    """Has this pod replaced through the in-cluster API — an eviction (``evict``, default)
    or a plain DELETE — and falls back to ``fallback`` on failure."""

    name = "kubernetes"

    def __init__(
        self,
        *,
        api_url: str | None,
        sa_dir: str,
        namespace: str | None,
        pod: str | None,
        grace: float,
        evict: bool = True,
        timeout: float = 5.0,
        retries: int = 3,
        deadline: float | None = None,
        fallback: Restarter,
    ) -> None:
        self.api_url = api_url.rstrip("/") if api_url else None
        self.sa_dir = sa_dir
        self.namespace = namespace
        self.pod = pod
        self.grace = grace
        self.evict = evict
        self.timeout = timeout
        self.retries = retries
        #: The whole call, retries and budget waits included, ends this long after it starts.
        self.deadline = deadline
        self.fallback = fallback
        self._fell_back = False

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
            evict=config.kubernetes_evict,
            timeout=config.api_timeout,
            retries=config.api_retries,
            deadline=config.shutdown_timeout,
            fallback=fallback,
        )

    def __repr__(self) -> str:
        return (
            f"PodDeleter(api={self.api_url!r}, namespace={self.namespace!r}, "
            f"pod={self.pod!r}, evict={self.evict})"
        )

    @property
    def doing(self) -> str:
        """What the call is, for the log: "pod eviction" or "pod deletion"."""
        return "pod eviction" if self.evict else "pod deletion"

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
        """The pod's URL; its eviction is this plus ``/eviction``."""
        quote = urllib.parse.quote
        return (
            f"{self.api_url}/api/v1/namespaces/{quote(self.namespace or '', safe='')}"
            f"/pods/{quote(self.pod or '', safe='')}"
        )

    def restart(self, reason: str) -> None:
        """Evict (or delete) the pod; on any failure at all, exit instead (once, said loudly)."""
        try:
            self._restart(reason)
        except Exception as exc:
            token = _read(self.sa_dir, "token") or ""
            shown = redact.text(str(exc), known=[token])
            log.error("memwarden: %s failed (%s: %s)", self.doing, type(exc).__name__, shown)
            self._fall_back()

    def _restart(self, reason: str) -> None:
        problems = self.problems()
        if problems:
            for problem in problems:
                log.error("memwarden: %s impossible: %s", self.doing, problem)
            return self._fall_back()
        token = Secret(_read(self.sa_dir, "token") or "")
        ca = os.path.join(self.sa_dir, "ca.crt")
        headers = {
            "Accept": "application/json",
            "Authorization": f"Bearer {token.reveal()}",
            "User-Agent": "memwarden",
        }
        verify = ssl.create_default_context(cafile=ca) if os.path.exists(ca) else True
        try:
            send = self._evict if self.evict else self._delete
            answer = send(headers, verify)
        except ApiError as exc:
            log.error("memwarden: %s", exc)
            return self._fall_back()
        log.warning(
            "memwarden: pod %s/%s is being %s (HTTP %d after %d tries, grace %gs): %s",
            self.namespace,
            self.pod,
            "evicted" if self.evict else "deleted",
            answer.status,
            answer.attempts,
            self.grace,
            reason,
        )

    def _refused(self, verb: str, rbac: str) -> dict[int, str]:
        sa = f"the service account of pod {self.pod}"
        return {
            401: f"the token in {self.sa_dir}/token was refused",
            403: f"{sa} may not {verb} pods: grant the Role in docs/kubernetes.md ({rbac})",
            404: f"no pod {self.pod!r} in namespace {self.namespace!r}: "
            "set POD_NAME/POD_NAMESPACE from the downward API",
        }

    def _delete(self, headers: Mapping[str, str], verify: Any) -> Answer:
        return call(
            "DELETE",
            self.url,
            headers=headers,
            json={
                "kind": "DeleteOptions",
                "apiVersion": "v1",
                "gracePeriodSeconds": int(self.grace),
            },
            what=f"deletion of pod {self.namespace}/{self.pod}",
            refused=self._refused("delete", "verbs: [delete], resources: [pods]"),
            timeout=self.timeout,
            retries=self.retries,
            deadline=self.deadline,
            verify=verify,
        )

    def _evict(self, headers: Mapping[str, str], verify: Any) -> Answer:
        """POST the Eviction; a 429 is asked again (after Retry-After, else a back-off)
        until the deadline, other failures raise :class:`ApiError` at once."""
        what = f"eviction of pod {self.namespace}/{self.pod}"
        refused = self._refused(
            "evict",
            "verbs: [create], resources: [pods/eviction]; or set "
            "MEMWARDEN_KUBERNETES_EVICT=false for a plain DELETE (verbs: [delete], "
            "resources: [pods])",
        )
        refused[429] = "the PodDisruptionBudget allows no disruption now"
        refused[500] = (
            "the API server refused the eviction; it says 500 when more than one "
            "PodDisruptionBudget selects the pod: keep one"
        )
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": self.pod, "namespace": self.namespace},
            "deleteOptions": {"gracePeriodSeconds": int(self.grace)},
        }
        deadline = self.deadline if self.deadline is not None else EVICTION_DEADLINE
        start = time.monotonic()
        end = start + deadline
        asked = 0
        while True:
            left = end - time.monotonic()
            try:
                answer = call(
                    "POST",
                    self.url + "/eviction",
                    headers=headers,
                    json=body,
                    what=what,
                    refused=refused,
                    timeout=self.timeout,
                    retries=self.retries,
                    deadline=max(left, 0.001),
                    verify=verify,
                )
            except ApiError as exc:
                if exc.status != 429:
                    raise
                asked += 1
                pause = budget_pause(asked, exc.retry_after)
                took = time.monotonic() - start
                if time.monotonic() + pause >= end:
                    raise ApiError(
                        f"{what}: the PodDisruptionBudget allowed no disruption in "
                        f"{took:.1f}s ({asked} tries, HTTP 429); the next try, {pause:.1f}s "
                        f"on, would pass the shutdown timeout ({deadline:g}s)",
                        429,
                    ) from None
                log.warning(
                    "memwarden: %s: HTTP 429: the PodDisruptionBudget allows no disruption "
                    "now (try %d); asking again in %.1fs",
                    what,
                    asked,
                    pause,
                )
                time.sleep(pause)
                continue
            failure = _failure_status(answer.body)
            if failure is not None:  # a 2xx carrying a Status of failure: not evicted
                raise ApiError(f"{what}: refused: {failure}", answer.status)
            return Answer(answer.status, answer.attempts + asked, answer.body)

    def _fall_back(self) -> None:
        if self._fell_back:
            return
        self._fell_back = True
        log.error("memwarden: restarting the local way instead (%s)", self.fallback.name)
        self.fallback.restart("pod deletion failed")  # an eviction is one too


def budget_pause(asked: int, retry_after: str | None) -> float:
    """Seconds before asking again after the ``asked``-th 429: the server's Retry-After
    (seconds) when it gives one — honoured whole, never cut short — else 0.5, 1, 2, 4, 5…"""
    if retry_after:
        try:
            seconds = float(retry_after)
        except ValueError:
            seconds = -1.0
        if seconds >= 0 and math.isfinite(seconds):
            return seconds
    return backoff(asked)


def _failure_status(body: str) -> str | None:
    """The message of a ``Status`` whose ``status`` is ``Failure`` (the API server may send
    one with a 2xx code: a pod with two PodDisruptionBudgets), else None."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("kind") != "Status":
        return None
    if data.get("status") != "Failure":
        return None
    message = " ".join(str(data.get("message") or "no message").split())[:300]
    return f"{message} (code {data.get('code')})"


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
    """``memwarden check``: what the pod's eviction (or deletion) still needs."""
    if config.restart != "kubernetes" or not config.kubernetes_delete_pod:
        return []
    return PodDeleter.from_env(config, env, KubernetesExit(config.exit_code)).problems()
