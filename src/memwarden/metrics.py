"""Prometheus metrics from the warden (extra ``metrics``: prometheus-client).

A :class:`Metrics` is a journal sink (counters move as records are written) plus gauges read
from the warden at scrape time. ``install(warden)`` puts them in the worker's registry (the
default one, or yours); ``MEMWARDEN_METRICS_PORT`` also serves them over HTTP, bound to
``MEMWARDEN_METRICS_ADDR`` (127.0.0.1 unless you say otherwise). Job kinds are labels, at
most :data:`MAX_KINDS` of them; later ones are counted as ``other``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from memwarden.events import State, cause_of, metric_label
from memwarden.gauges.proc import self_rss

log = logging.getLogger("memwarden")

MAX_KINDS = 50
STATES = tuple(s.value for s in State)

#: name, help, labels of the counters (exported with ``_total``).
COUNTERS = {
    "jobs": ("memwarden_jobs", "Jobs finished, by job kind", ("job",)),
    "growth": (
        "memwarden_job_rss_growth_bytes",
        "RSS growth over jobs that grew memory, by job kind",
        ("job",),
    ),
    "reclaims": ("memwarden_reclaims", "Reclaims (gc + malloc_trim), by reason", ("reason",)),
    "reclaimed": ("memwarden_reclaimed_bytes", "Bytes given back by reclaims", ()),
    "restarts": (
        "memwarden_restarts",
        "Restarts and child recycles, by reason and action",
        ("reason", "action"),
    ),
    "kills": ("memwarden_kills", "Hard kills, by reason", ("reason",)),
    "oom_kills": (
        "memwarden_oom_kills",
        "Kernel OOM kills seen in the worker's cgroup (the ladder acted too late)",
        (),
    ),
    "pauses": ("memwarden_intake_pauses", "Intake paused over the soft limit", ()),
}


class Metrics:
    """The warden's metrics in one registry; ``sink`` is added to the warden's journal."""

    def __init__(self, warden: Any, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Summary

        self.warden = warden
        self.registry = REGISTRY if registry is None else registry
        self._kinds: set[str] = set()
        self._lock = threading.Lock()
        reg = self.registry
        self.counters = {
            key: Counter(name, doc, labels, registry=reg)
            for key, (name, doc, labels) in COUNTERS.items()
        }
        self.delta = Summary(
            "memwarden_job_rss_delta_bytes",
            "RSS change over one job (after - before), by job kind",
            ("job",),
            registry=reg,
        )
        gauges: dict[str, tuple[str, Callable[[], float]]] = {
            "memwarden_memory_bytes": ("Memory the limits are checked against", self._total),
            "memwarden_rss_bytes": ("This process's resident set size", self_rss),
            "memwarden_soft_limit_bytes": ("Soft limit (0: none)", lambda: self._limit("soft")),
            "memwarden_hard_limit_bytes": ("Hard limit (0: none)", lambda: self._limit("hard")),
            "memwarden_quota_bytes": ("Detected memory quota (0: none)", self._quota),
        }
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=reg).set_function(fn)
        state = Gauge("memwarden_state", "1 for the warden's state", ("state",), registry=reg)
        for s in STATES:
            state.labels(s).set_function(self._in_state(s))
        reg.register(KernelSignals(lambda: getattr(self.warden, "signals", None)))

    # -- read at scrape time
    def _in_state(self, state: str) -> Callable[[], float]:
        return lambda: float(self.state() == state)

    def _total(self) -> float:
        sample = self.warden.last_sample
        return float(sample.total) if sample is not None else float(self_rss())

    def _limit(self, which: str) -> float:
        return float(getattr(self.warden.limits, which) or 0)

    def _quota(self) -> float:
        return float(self.warden.quota.limit or 0)

    def state(self) -> str:
        sample = self.warden.last_sample
        state: State = self.warden.policy.state(None if sample is None else sample.total)
        return state.value

    # -- moved by journal records
    def _kind(self, job: Any) -> str:
        kind = str(job)
        with self._lock:
            if kind in self._kinds:
                return kind
            if len(self._kinds) < MAX_KINDS:
                self._kinds.add(kind)
                return kind
        return "other"

    def sink(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if record.get("dry_run"):
            return
        c = self.counters
        if event == "job":
            kind = self._kind(record.get("job"))
            delta = float(record.get("rss_after", 0)) - float(record.get("rss_before", 0))
            c["jobs"].labels(kind).inc()
            self.delta.labels(kind).observe(delta)
            if delta > 0:
                c["growth"].labels(kind).inc(delta)
        elif event == "reclaim":
            c["reclaims"].labels(metric_label(cause_of(record))).inc()
            c["reclaimed"].inc(max(0.0, float(record.get("freed") or 0)))
        elif event == "restart":
            reason = metric_label(cause_of(record))
            c["restarts"].labels(reason, str(record.get("action") or "restart")).inc()
        elif event == "kill":
            c["kills"].labels(metric_label(cause_of(record))).inc()
        elif event == "oom_kill":
            c["oom_kills"].inc(max(0.0, float(record.get("kills") or 0)))
        elif event == "pause":
            c["pauses"].inc()


class KernelSignals:
    """The kernel's memory pressure (PSI) and the cgroup's memory events, read at scrape
    time from ``signals()`` (a :class:`memwarden.gauges.pressure.Signals`, or None)."""

    WINDOWS = ("10s", "60s", "300s")

    def __init__(self, signals: Callable[[], Any]) -> None:
        self.signals = signals

    def describe(self) -> Iterator[Any]:
        return self._families(None, {})

    def collect(self) -> Iterator[Any]:
        signals = self.signals()
        if signals is None:
            return self._families(None, {})
        return self._families(signals.pressure(), signals.events())

    def _families(self, psi: Any, events: dict[str, int]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ratio = GaugeMetricFamily(
            "memwarden_memory_pressure_ratio",
            "Share of time some / all (full) tasks stalled on memory, averaged over a window "
            "(PSI; source: the cgroup's, or the system's)",
            labels=("kind", "window", "source"),
        )
        stalled = CounterMetricFamily(
            "memwarden_memory_pressure_stalled_seconds",
            "Time some / all (full) tasks stalled on memory (PSI total)",
            labels=("kind", "source"),
        )
        counts = CounterMetricFamily(
            "memwarden_cgroup_memory_events",
            "The cgroup's memory events: high (throttled), max (at the limit), oom, oom_kill "
            "(v1: oom_kill alone)",
            labels=("event",),
        )
        if psi is not None:
            for kind, avgs, total in (
                ("some", psi.some, psi.some_total),
                ("full", psi.full, psi.full_total),
            ):
                for window, value in zip(self.WINDOWS, avgs, strict=True):
                    ratio.add_metric((kind, window, psi.source), value / 100.0)
                stalled.add_metric((kind, psi.source), total / 1e6)
        for event, count in events.items():
            counts.add_metric((event,), float(count))
        yield from (ratio, stalled, counts)


_installed: dict[int, Metrics] = {}


def install(warden: Any, registry: Any = None) -> Metrics:
    """Export ``warden``'s metrics in ``registry`` (default: prometheus-client's). A second
    warden in the same registry takes the metrics over (names must be unique per registry)."""
    from prometheus_client import REGISTRY

    reg = REGISTRY if registry is None else registry
    metrics = _installed.get(id(reg))
    if metrics is None:
        metrics = _installed[id(reg)] = Metrics(warden, reg)
    else:
        metrics.warden = warden
    if metrics.sink not in warden.journal.sinks:
        warden.journal.sinks.append(metrics.sink)
    return metrics


def serve(warden: Any, port: int, addr: str = "127.0.0.1") -> Metrics | None:
    """``install`` and serve ``/metrics`` on ``addr:port``; None (logged) if it cannot."""
    try:
        from prometheus_client import start_http_server
    except ImportError:
        log.warning("memwarden: MEMWARDEN_METRICS_PORT needs `pip install memwarden[metrics]`")
        return None
    metrics = install(warden)
    try:
        start_http_server(port, addr=addr, registry=metrics.registry)
    except OSError as exc:
        log.warning("memwarden: metrics not served on %s:%s: %s", addr, port, exc)
        return metrics
    log.info("memwarden: metrics on http://%s:%s/metrics", addr, port)
    return metrics
