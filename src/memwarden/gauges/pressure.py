"""Memory pressure (PSI) and the cgroup's memory events: how hard the kernel works for memory.

**PSI** (``memory.pressure`` of a v2 cgroup; ``/proc/pressure/memory`` for the whole system,
used where the cgroup has none, as on v1): the share of wall time in which *some* task, or
*all* non-idle tasks at once (*full*), stalled waiting for memory — reclaim, refaults of
evicted pages, swap-in — averaged over 10, 60 and 300 s (percent), and the total stall in
microseconds. Sustained *full* pressure is what systemd-oomd and oomd act on: the workload
is thrashing, short of the limit.

**Memory events** (v2 ``memory.events``, counts since the cgroup was made): ``high`` (over
``memory.high``: throttled), ``max`` (a charge over ``memory.max``, before reclaim), ``oom``
(reclaim failed: the cgroup went out of memory), ``oom_kill`` (processes the OOM killer
killed). v1 has no such file: ``oom_kill`` is ``memory.oom_control``'s, the others are
absent (``memory.failcnt`` is not taken for ``max``: on this project's 6.x v1 machines it
stays 0 through a real OOM kill).

Both are read once a second at most (the journal's ``sample``), and at a scrape.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from memwarden.gauges.cgroup import Cgroup

#: The ``memory.events`` counts memwarden shows.
EVENTS = ("high", "max", "oom", "oom_kill")
SYSTEM_PRESSURE = "/proc/pressure/memory"


@dataclass(frozen=True)
class Pressure:
    """One PSI reading: averages in percent over (10 s, 60 s, 300 s), totals in µs."""

    source: str  # "cgroup" (this cgroup's) or "system" (the whole machine's)
    path: str
    some: tuple[float, float, float]
    full: tuple[float, float, float]
    some_total: int
    full_total: int

    def brief(self) -> dict[str, float]:
        """The journal's figures: some and full over 10 and 60 s (percent)."""
        return {
            "some10": self.some[0],
            "some60": self.some[1],
            "full10": self.full[0],
            "full60": self.full[1],
        }

    def describe(self) -> str:
        """``some 1.20/0.80/0.10 full 0.50/0.30/0.00 % (avg10/60/300, cgroup)``."""

        def avgs(values: tuple[float, float, float]) -> str:
            return "/".join(f"{v:.2f}" for v in values)

        return f"some {avgs(self.some)} full {avgs(self.full)} % (avg10/60/300, {self.source})"


def parse_pressure(text: str, source: str = "cgroup", path: str = "") -> Pressure:
    """A PSI file's text (``some avg10=… avg60=… avg300=… total=…`` and a ``full`` line).
    A line that is missing reads as no pressure; a malformed one raises ValueError."""
    found: dict[str, tuple[tuple[float, float, float], int]] = {}
    for line in text.splitlines():
        kind, _, rest = line.strip().partition(" ")
        if kind not in ("some", "full"):
            continue
        fields = dict(part.split("=", 1) for part in rest.split() if "=" in part)
        try:
            avgs = (float(fields["avg10"]), float(fields["avg60"]), float(fields["avg300"]))
            total = int(fields["total"])
        except (KeyError, ValueError) as exc:
            raise ValueError(f"not a PSI line: {line.strip()!r}") from exc
        found[kind] = (avgs, total)
    if not found:
        raise ValueError("no PSI line (some/full)")
    none = ((0.0, 0.0, 0.0), 0)
    some, full = found.get("some", none), found.get("full", none)
    return Pressure(source, path, some[0], full[0], some[1], full[1])


def parse_events(text: str) -> dict[str, int]:
    """``memory.events`` (``name count`` lines) as a dict of every count in it."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key and value.strip().isdigit():
            out[key] = int(value)
    return out


class Signals:
    """The pressure and memory events of ``cgroup`` (None: the system's pressure alone).
    ``system`` is the machine-wide PSI file (tests point it elsewhere)."""

    def __init__(self, cgroup: Cgroup | None, system: str = SYSTEM_PRESSURE) -> None:
        self.cgroup = cgroup
        own = os.path.join(cgroup.path, "memory.pressure") if cgroup is not None else None
        if own is not None and cgroup is not None and cgroup.version == 2:
            self.pressure_path, self.pressure_source = own, "cgroup"
        else:
            self.pressure_path, self.pressure_source = system, "system"

    def __repr__(self) -> str:
        return f"Signals({self.pressure_source}: {self.pressure_path!r}, cgroup={self.cgroup!r})"

    def pressure(self) -> Pressure | None:
        """PSI now, or None where the kernel keeps none (no file, ``psi=0``: EOPNOTSUPP)."""
        try:
            with open(self.pressure_path) as f:
                text = f.read()
            return parse_pressure(text, self.pressure_source, self.pressure_path)
        except (OSError, ValueError):
            return None

    def full10(self) -> float | None:
        """The cgroup's full pressure over 10 s as a fraction, for the policy's trigger; None
        where only the system's is read (on v1 it counts other tenants' stalls) or none."""
        if self.pressure_source != "cgroup":
            return None
        psi = self.pressure()
        return None if psi is None else psi.full[0] / 100

    def events(self) -> dict[str, int]:
        """:data:`EVENTS` counts of the cgroup (v1: ``oom_kill`` alone); {} with no cgroup or
        nothing readable."""
        cg = self.cgroup
        if cg is None:
            return {}
        if cg.version == 2:
            counts = _counts(os.path.join(cg.path, "memory.events"))
            return {k: counts[k] for k in EVENTS if k in counts}
        kills = _counts(os.path.join(cg.path, "memory.oom_control")).get("oom_kill")
        return {} if kills is None else {"oom_kill": kills}

    def journal_fields(self) -> dict[str, object]:
        """What a journal ``sample`` carries: ``psi`` (some/full over 10 and 60 s, percent,
        and its source) and ``events`` (the counts); each left out when unreadable."""
        out: dict[str, object] = {}
        psi = self.pressure()
        if psi is not None:
            out["psi"] = {**psi.brief(), "src": psi.source}
        events = self.events()
        if events:
            out["events"] = events
        return out


def _counts(path: str) -> dict[str, int]:
    try:
        with open(path) as f:
            return parse_events(f.read())
    except OSError:
        return {}
