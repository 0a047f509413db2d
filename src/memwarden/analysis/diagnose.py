"""Leak, bloat or stable — and which job kind — from journal records alone.

Pure functions over records (docs/journal.md "Records"); no framework, no numpy. Records
are read once, as they come (:class:`memwarden.analysis.digest.Digest`): memory is bounded by the
number of process lifetimes and job kinds, not by the journal's length.

- **Lifetimes** (:mod:`memwarden.analysis.digest`): records grouped by host and pid, a reused pid
  after a stop is a new lifetime; a forking worker's jobs belong to the worker;
  ``memwarden run``'s readings are the command's figure.
- **Levels.** The memory level after each job is ``rss_after``; the *sustained* level is the
  minimum over the next few jobs, so a transient spike that comes back down counts for
  nothing.
- **Pattern**, per lifetime: a Theil–Sen slope over the last half tells a leak (growth keeps
  going) from bloat (steps or a ramp that level off into a plateau); growth within the noise
  is stable, and so is a warm-up of a few MiB that levels off (thread arenas, a cache filled
  once). Lifetimes vote, weighted by their jobs. Live memory (:func:`memwarden.trace.
  live_bytes`: malloc's live bytes, mmap'd blocks included, plus Python's), when every job
  records it, decides between leak (live memory grows) and bloat (RSS grows, live memory
  does not); where it is missing or blind to some allocations, the verdict says so and
  leans on RSS.
- **Attribution.** RSS growth often lands in a different job than the one that caused it
  (a leak fills free arena space, the next job needing fresh arenas takes the jump), and
  jobs that run at once share one process. So a leak is attributed from RSS by an event
  study over horizons of 4 to 64 jobs (:func:`attribute_events`), not by per-job deltas;
  from live memory by a regression of its change over windows of jobs on the kinds that
  ran in them (:func:`attribute_windows`; windows as wide as the jobs that overlap); bloat
  by which kind's runs raised the sustained high-water mark, net of chance
  (:func:`attribute_bloat`). Series merged for length are attributed over their merged
  points the same ways.
- **Advice** is checked against the limits the journal shows (soft, hard, a pool child's
  share, the quota of an OOM kill) before it is printed: nothing that would raise a limit
  past the hard limit or the quota.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from memwarden.analysis.digest import (
    OTHER,
    SUSTAIN,
    Digest,
    Life,
    ReasonGroup,
    median,
)
from memwarden.analysis.read import ReadSummary, read_journals
from memwarden.events import action_word
from memwarden.units import format_duration, format_size

__all__ = [
    "Analysis",
    "action_word",
    "analyse",
    "diagnose",
    "leak_suspects",
    "load",
    "median",
    "nnls",
    "sustained",
    "theil_sen",
    "verdict_text",
]

MiB = 1024 * 1024
MIN_JOBS = 12  # fewer jobs in a lifetime say nothing about its shape
MAX_KINDS = 24  # kinds in the regression; the rest are pooled as OTHER
MAX_ROWS = 6000  # regression rows (evenly thinned; cumulative counts stay exact)
#: A rise this small that levels off is a warm-up (arenas, caches filled once): stable.
WARMUP_BYTES = 8 * MiB
WARMUP_SHARE = 0.05
#: Margin above a plateau for a soft limit that avoids restarts.
MARGIN = 1.1
UNKNOWN = "unknown"


# ----------------------------------------------------------------------------- statistics
def theil_sen(ys: Sequence[float], max_points: int = 120) -> float:
    """Median of pairwise slopes of ``ys`` against their index (bins medians when long)."""
    n = len(ys)
    if n < 2:
        return 0.0
    if n > max_points:
        step = n / max_points
        pts = []
        for b in range(max_points):
            lo, hi = int(b * step), max(int((b + 1) * step), int(b * step) + 1)
            pts.append(((lo + hi - 1) / 2.0, median(ys[lo:hi])))
    else:
        pts = [(float(i), float(y)) for i, y in enumerate(ys)]
    slopes = [
        (pts[j][1] - pts[i][1]) / (pts[j][0] - pts[i][0])
        for i in range(len(pts))
        for j in range(i + 1, len(pts))
    ]
    return median(slopes)


def sustained(ys: Sequence[float], window: int) -> list[float]:
    """``min(ys[i : i + window])``: the level that stays, spikes removed (monotone deque).

    In the last ``window - 1`` jobs a rise cannot be confirmed yet: the level is held."""
    import collections

    n = len(ys)
    out: list[float] = [0.0] * n
    q: collections.deque[int] = collections.deque()  # increasing values, from the right
    for i in range(n - 1, -1, -1):
        while q and ys[q[-1]] >= ys[i]:
            q.pop()
        q.append(i)
        while q[0] >= i + window:
            q.popleft()
        out[i] = float(ys[q[0]])
    for i in range(max(1, n - window + 1), n):
        out[i] = min(out[i], out[i - 1])
    return out


def normal_equations(
    rows: list[list[float]], ys: list[float]
) -> tuple[list[list[float]], list[float]]:
    """``XᵀX`` and ``Xᵀy`` of the rows ``X`` and values ``y``."""
    k = len(rows[0]) if rows else 0
    gram = [[0.0] * k for _ in range(k)]
    rhs = [0.0] * k
    for row, y in zip(rows, ys, strict=True):
        nz = [(j, v) for j, v in enumerate(row) if v]
        for a, va in nz:
            rhs[a] += va * y
            g = gram[a]
            for b, vb in nz:
                g[b] += va * vb
    return gram, rhs


def collinear(gram: list[list[float]]) -> bool:
    """Whether the columns that are used (``gram[j][j] > 0``) are linearly dependent: one
    column's counts follow from the others' in every row (kinds served in turn, counted
    in windows that span whole turns, hold the same mix in every row), so no regression
    can tell which of them made the change."""
    used = [j for j in range(len(gram)) if gram[j][j] > 0]
    norm = [math.sqrt(gram[j][j]) for j in used]
    corr = [
        [gram[i][j] / (norm[a] * norm[b]) for b, j in enumerate(used)] for a, i in enumerate(used)
    ]
    return len(used) > 1 and _solve(corr, [0.0] * len(used)) is None


def nnls(
    rows: list[list[float]],
    ys: list[float],
    sweeps: int = 3000,
    normal: tuple[list[list[float]], list[float]] | None = None,
) -> list[float]:
    """Non-negative least squares by coordinate descent on the (scaled) normal equations
    (``normal``: :func:`normal_equations` of ``rows`` and ``ys``, when known)."""
    gram, rhs = normal or normal_equations(rows, ys)
    k = len(gram)
    scale = [math.sqrt(gram[j][j]) if gram[j][j] > 0 else 0.0 for j in range(k)]
    beta = [0.0] * k
    for _ in range(sweeps):
        moved = 0.0
        for j in range(k):
            if scale[j] == 0.0:
                continue
            g = gram[j]
            grad = rhs[j] - sum(g[m] * beta[m] for m in range(k))
            new = max(0.0, beta[j] + grad / gram[j][j])
            moved = max(moved, abs(new - beta[j]) * scale[j])
            beta[j] = new
        if moved <= 1e-9 * (1.0 + max(abs(y) for y in ys)):
            break
    return beta


def _clip(x: float) -> float:
    return max(0.0, min(1.0, x))


# ----------------------------------------------------------------------------- pattern
@dataclass
class Shape:
    """The evidence about one lifetime's memory curve."""

    pid: Any
    jobs: int  # jobs (or readings, when ``source`` is "readings") in the lifetime
    source: str  # "jobs": levels after each job; "readings": the watchdog's samples
    start_bytes: float
    end_bytes: float
    peak_bytes: float
    growth_bytes: float
    tail_slope: float  # bytes per job (or reading) over the last half
    tail_growth_bytes: float
    step_share: float  # share of the rise made by the 3 biggest sustained steps
    plateau_jobs: int  # jobs since the sustained level last rose noticeably
    noise_bytes: float
    live_tail_growth_bytes: float | None
    hours: float  # the lifetime's length
    tail_per_hour: float | None  # bytes per hour over the last half
    verdict: str
    confidence: float
    warmup: bool = False  # a small rise that levelled off: called stable

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


def window_for(n: int) -> int:
    return max(3, min(20, n // 60))


def _levels(life: Life) -> tuple[str, list[float], Sequence[float], int, bool] | None:
    """(source, levels, times, records, exact) of the series a lifetime is judged on: its
    jobs, or the watchdog's readings when jobs are too few (long jobs, a pool parent)."""
    jobs, samples = life.jobs, life.samples
    njobs, nread = jobs.jobs, samples.readings
    if njobs >= MIN_JOBS or nread < MIN_JOBS:
        return "jobs", list(jobs.lo), jobs.ts, njobs, jobs.exact
    return "readings", list(samples.lo), samples.ts, nread, samples.per == 1


def shape_of(life: Life) -> Shape | None:
    picked = _levels(life)
    if picked is None:
        return None
    source, ys, ts, total, exact = picked
    n = len(ys)
    if total < MIN_JOBS or n < 3:
        return None
    per = total / n  # records per point (1 until a long series merged)
    s = sustained(ys, window_for(total) if exact else max(1, math.ceil(SUSTAIN / per)))
    k = max(3, min(n // 10, 300))  # the start: after warm-up, before a long life's steps
    start, end = median(s[:k]), median(s[-k:])
    growth = end - start
    half = s[n // 2 :]
    tail_slope = theil_sen(half)
    tail_growth = tail_slope * (len(half) - 1)
    diffs = [ys[i] - ys[i - 1] for i in range(1, n)]
    mid = median(diffs)
    noise = 1.4826 * median([abs(d - mid) for d in diffs]) / math.sqrt(2)
    marks = [s[0]]
    for v in s[1:]:
        marks.append(max(marks[-1], v))  # the high-water mark after each point
    rises = sorted((marks[i] - marks[i - 1] for i in range(1, n)), reverse=True)
    total_rise = sum(rises)
    step_share = sum(rises[:3]) / total_rise if total_rise > 0 else 0.0
    # plateau: points since the high-water mark came within reach of its final height
    tol = max(3 * noise, 0.05 * max(growth, 0.0), 256 * 1024)
    last_low = max((i for i, v in enumerate(marks) if v < marks[-1] - tol), default=-1)
    plateau = n - 1 - last_low
    meaningful = max(4 * noise, 0.03 * start, 2 * MiB)
    live_tail = None
    if source == "jobs" and life.live_known >= total:
        live = list(life.jobs.live)
        lh = live[n // 2 :]
        if not any(math.isnan(v) for v in lh):
            live_tail = theil_sen(lh) * (len(lh) - 1)
    # a leak makes new highs: the end stands above everything the first half reached
    new_high = end - max(s[: n // 2])
    first = median(s[:3])
    early = end - first
    verdict, conf = _verdict(growth, tail_growth, new_high, meaningful, plateau, n, live_tail)
    warm = max(WARMUP_BYTES, WARMUP_SHARE * start)
    # a big step in the very first jobs (not warm-up-sized) that stays is a high-water mark
    if verdict == "stable" and early >= max(0.25 * first, 4 * meaningful, warm):
        verdict, conf = "bloat", 0.6
    warmup = False
    if verdict == "bloat" and max(growth, early) < warm and plateau * 3 >= n:
        verdict, conf, warmup = "stable", _clip(0.6 + 0.4 * (1 - max(growth, early) / warm)), True
    span = ts[-1] - ts[n // 2] if n > 1 else 0.0
    return Shape(
        pid=life.pid,
        jobs=total,
        source=source,
        start_bytes=start,
        end_bytes=end,
        peak_bytes=max(s),
        growth_bytes=growth,
        tail_slope=tail_slope / per,
        tail_growth_bytes=tail_growth,
        step_share=step_share,
        plateau_jobs=round(plateau * per),
        noise_bytes=noise,
        live_tail_growth_bytes=live_tail,
        hours=max(0.0, ts[-1] - ts[0]) / 3600,
        tail_per_hour=tail_growth / span * 3600 if span > 0 else None,
        verdict=verdict,
        confidence=conf,
        warmup=warmup,
    )


def _verdict(
    growth: float,
    tail: float,
    new_high: float,
    meaningful: float,
    plateau: int,
    n: int,
    live_tail: float | None,
) -> tuple[str, float]:
    rise = max(growth, tail)
    if live_tail is not None and live_tail >= meaningful:
        # live memory keeps growing over the last half: objects are kept — a leak
        return "leak", _clip(0.6 + 0.4 * min(1.0, live_tail / (3 * meaningful)))
    if rise < meaningful:
        return "stable", _clip(1.0 - rise / meaningful)
    if live_tail is not None:
        # RSS grew, live memory did not: the allocator keeps freed memory — bloat
        return "bloat", _clip(0.6 + 0.4 * (1.0 - max(0.0, live_tail) / meaningful))
    share = tail / growth if growth > 0 else 1.0
    if tail >= meaningful and share >= 0.2 and new_high >= meaningful / 2:
        strength = min(1.0, tail / (2 * meaningful)) * min(1.0, share / 0.4)
        return "leak", _clip(0.5 + 0.5 * strength)
    flat = plateau / n
    strength = max(1.0 - max(0.0, share) / 0.2, min(1.0, 2 * flat)) * min(1.0, growth / meaningful)
    return "bloat", _clip(0.5 + 0.5 * strength)


def vote(shapes: list[Shape]) -> tuple[str, float]:
    """The lifetimes' verdicts, weighted by jobs (√ so one long lifetime cannot drown all)."""
    if not shapes:
        return UNKNOWN, 0.0
    score: defaultdict[str, float] = defaultdict(float)
    weight = 0.0
    for sh in shapes:
        w = math.sqrt(sh.jobs)
        score[sh.verdict] += w * sh.confidence
        weight += w
    pattern, best = max(score.items(), key=lambda kv: kv[1])
    return pattern, round(_clip(best / weight), 3)


# ----------------------------------------------------------------------------- attribution
Attribution = dict[str, dict[str, float]]


class Kinds:
    """Job kind ids ↔ names, and the regression's columns (the most run kinds)."""

    def __init__(self, digest: Digest) -> None:
        self.names = digest.kind_names
        order = sorted(range(len(self.names)), key=lambda k: -digest.kinds[k].runs)
        self.columns = {k: c for c, k in enumerate(order[:MAX_KINDS])}
        self.width = len(self.columns) + 1  # the last pools the rare kinds

    def column(self, kind: int) -> int:
        return self.columns.get(kind, self.width - 1)

    def name_of_column(self, col: int) -> str:
        for k, c in self.columns.items():
            if c == col:
                return self.names[k]
        return OTHER


def _job_lives(lives: list[Life]) -> list[Life]:
    return [life for life in lives if life.jobs.jobs >= MIN_JOBS]


def attribution_window(lives: list[Life], digest: Digest) -> int:
    """Jobs per window: long enough that the rarest blamed kind runs a few times in one
    (so growth that lands a few jobs late stays in its window), short enough for many."""
    runs = [s.runs for s in digest.kinds if s.runs]
    total = sum(runs)
    if not total:
        return 1
    rare = min((v / total for v in runs if v / total >= 0.02), default=0.02)
    steady = max((life.jobs.jobs * 4 // 5 for life in lives), default=0)
    return int(max(12, min(3 / rare, 60, max(12, steady // 8))))


def attribute_windows(
    lives: list[Life], kinds: Kinds, window: int, live: bool = False
) -> Attribution:
    """Bytes per run for each kind: NNLS of the level's change over windows of ``window``
    jobs on how many times each kind ran in the window.

    Not per job: growth often lands in a later job than the one that caused it, and jobs
    that run at once all end inside a window that holds both. Not the raw level on
    cumulative counts either: the level's noise is autocorrelated (high-water marks,
    allocator state) and cumulative counts are random walks, which regress spuriously on
    each other. Windows overlap by half. Per lifetime the first fifth (warm-up) is left
    out. ``live`` regresses live memory (allocated bytes: no arena delay, so a window
    as short as the jobs that overlap) instead of the sustained RSS level."""
    rows: list[list[float]] = []
    ys: list[float] = []
    runs: Counter[int] = Counter()
    for life in _job_lives(lives):
        _window_changes(life, kinds, window, _window_series(life, live), rows, ys, runs)
    if not rows:
        return {}
    return _fit_windows(rows, ys, runs, kinds)


def _window_series(life: Life, live: bool) -> list[float]:
    """The level :func:`attribute_windows` regresses for one lifetime: live memory, or the
    sustained RSS level."""
    js = life.jobs
    per = js.jobs / len(js.n)
    if live:
        series = list(js.live)
        if life.concurrency >= 1.5 and not any(math.isnan(v) for v in series):
            # a reading at one job's end holds the temporaries of the jobs still
            # running: the lowest of the next few readings is what stays
            series = sustained(series, max(3, round(2 * life.concurrency)))
        return series
    w = window_for(js.jobs) if js.exact else max(1, math.ceil(SUSTAIN / per))
    return sustained(list(js.lo), w)


def _window_changes(
    life: Life,
    kinds: Kinds,
    window: int,
    series: list[float],
    rows: list[list[float]],
    ys: list[float],
    runs: Counter[int],
) -> None:
    """One lifetime's windows (past its warm-up fifth, overlapping by half): the kinds run
    in each go into ``rows``, the level's change over it into ``ys``, the runs past the
    warm-up into ``runs``."""
    js = life.jobs
    n = len(js.n)
    per = js.jobs / n
    width = kinds.width
    cols = [[(kinds.column(k), c) for k, c in js.kinds_at(i)] for i in range(n)]
    skip = n // 5
    for i in range(skip, n):
        for col, c in cols[i]:
            runs[col] += c
    size = min(max(1, round(window / per)), n - skip - 1)
    if size < 1:
        return
    spans = js.exact and life.concurrency >= 1.5
    for a in range(skip, n - size, max(1, size // 2)):
        b = a + size  # window: points a+1 .. b, change from after a to after b
        change = series[b] - series[a]
        if math.isnan(change):
            continue
        rows.append(_overlaps(life, a, b, cols, width) if spans else _ran(a, b, cols, width))
        ys.append(change)


def _ran(a: int, b: int, cols: list[list[tuple[int, int]]], width: int) -> list[float]:
    """How many times each kind column ran in points ``a + 1`` to ``b``."""
    row = [0.0] * width
    for i in range(a + 1, b + 1):
        for col, c in cols[i]:
            row[col] += c
    return row


def _fit_windows(
    rows: list[list[float]], ys: list[float], runs: Counter[int], kinds: Kinds
) -> Attribution:
    """NNLS of the windows' changes on their kinds (rows evenly thinned to
    :data:`MAX_ROWS`): bytes per run, and over all runs, for each kind that ran."""
    if len(rows) > MAX_ROWS:
        step = len(rows) / MAX_ROWS
        keep = [int(i * step) for i in range(MAX_ROWS)]
        rows, ys = [rows[i] for i in keep], [ys[i] for i in keep]
    normal = normal_equations(rows, ys)
    if collinear(normal[0]):
        return {}  # the windows cannot tell the kinds apart: this says nothing
    beta = nnls(rows, ys, normal=normal)
    out: Attribution = {}
    for col, coef in enumerate(beta):
        if runs[col]:
            name = kinds.name_of_column(col)
            out[name] = {
                "per_run_bytes": coef,
                "growth_bytes": coef * runs[col],
                "runs": runs[col],
            }
    return out


def _overlaps(
    life: Life, a: int, b: int, cols: list[list[tuple[int, int]]], width: int
) -> list[float]:
    """For jobs that run at once: the share of each job's running time inside the window
    from the end of job ``a`` to the end of job ``b``, summed per kind (a job counts where
    it ran, not where it happened to end)."""
    js = life.jobs
    t0, t1 = js.ts[a], js.ts[b]
    row = [0.0] * width
    longest = life.longest_s
    n = len(js.n)
    j = a + 1
    while j < n and js.ts[j] - longest < t1 and j <= b + 64 * (b - a):
        start, end = js.start[j], js.ts[j]
        if end > t0:
            took = end - start
            if took <= 0:
                share = 1.0 if end <= t1 else 0.0
            else:
                share = max(0.0, min(end, t1) - max(start, t0)) / took
            if share:
                for col, c in cols[j]:
                    row[col] += share * c
        j += 1
    return row


def _trimmed(xs: list[float], cut: float = 0.1) -> tuple[float, float, int]:
    """Mean, variance and count of ``xs`` without the lowest and highest ``cut`` share."""
    s = sorted(xs)
    k = int(len(s) * cut)
    s = s[k : len(s) - k] or s
    m = sum(s) / len(s)
    return m, sum((x - m) ** 2 for x in s) / max(1, len(s) - 1), len(s)


HORIZONS = (4, 8, 16, 32, 64)


def attribute_events(lives: list[Life], kinds: Kinds) -> Attribution:
    """Bytes per run for each kind from RSS, as an event study over several horizons
    (lifetimes with one point per job).

    For each run of a kind: the sustained level's change from just before it to ``h`` jobs
    past it, against the same change after any job (trimmed means: a fragmentation step
    or a trim in a few stretches cannot steer it). Growth a kind causes may land in a later
    job (a leak fills free arena space, the next job needing fresh heap takes the jump),
    so short horizons blame the job that showed it; but that job's effect does not last —
    the next time it has less to pay back — while the cause's keeps growing with ``h``.
    So the evidence for a kind is its z-score summed over horizons 4 to 64 jobs, and its
    bytes per run the mean of its positive estimates, shrunk by (evidence / the best
    kind's evidence)² so a weakly supported kind's noisy estimate cannot outweigh the
    clear culprit. A difference of means against the overall rate, not a regression on
    counts (window counts add up to the window length and let a frequent kind stand in for
    the drift).

    The kinds around a run are not always random: a queue that serves kinds in turn
    (leak, light, light, …) puts the same neighbours in every window of a kind. Each
    window's difference is therefore read against how its kinds differ from the average
    window's (:func:`_unmix`): the neighbours' share is taken out, not credited to the kind
    they happen to follow."""
    levels = _event_levels(lives)
    runs: Counter[int] = Counter()
    for top, _, skip in levels:
        runs.update(top[skip:])
    z: defaultdict[int, float] = defaultdict(float)
    estimates: dict[int, list[float]] = defaultdict(list)
    longest = max((len(s) - skip for _, s, skip in levels), default=0)
    for h in HORIZONS:
        if h > max(HORIZONS[0], longest // 8):  # a few independent stretches at least
            break
        for kind, (effect, se) in _horizon_effects(levels, h).items():
            z[kind] += effect / se if se > 0 else 0.0
            estimates[kind].append(effect)
    return _event_attribution(z, estimates, runs, kinds)


#: Per lifetime with one point per job: the kind of each job, the sustained level after
#: it, and the jobs of its warm-up.
Levels = list[tuple[list[int], list[float], int]]


def _event_levels(lives: list[Life]) -> Levels:
    """What :func:`attribute_events` reads of the lifetimes with one point per job."""
    levels = []
    for life in _job_lives(lives):
        js = life.jobs
        if js.exact:
            n = len(js.n)
            levels.append((list(js.top), sustained(list(js.lo), window_for(n)), max(1, n // 5)))
    return levels


def _horizon_gains(
    levels: Levels, h: int
) -> tuple[dict[int, list[float]], list[float], defaultdict[int, Counter[int]]]:
    """The level's changes over ``h`` jobs past each job: per kind of that job, all of
    them, and per kind the kinds in its windows, summed (the mix).

    The sustained level at i already sees a few jobs ahead (a rise just after job i can
    show in it): the "before" reference is taken a few jobs back (at most 5: longer
    stretches gather the big swings of a fragmented heap)."""
    gains: dict[int, list[float]] = defaultdict(list)
    every: list[float] = []
    mix: defaultdict[int, Counter[int]] = defaultdict(Counter)
    for top, s, skip in levels:
        back = min(window_for(len(s)), 5)
        first = max(skip, back)
        if first >= len(s) - h:
            continue
        inside = Counter(top[first - back + 1 : first + h + 1])  # jobs of the window
        for i in range(first, len(s) - h):
            if i > first:
                gone = top[i - back]
                inside[gone] -= 1
                if not inside[gone]:
                    del inside[gone]  # only the kinds in the window are summed
                inside[top[i + h]] += 1
            g = s[i + h] - s[i - back]
            gains[top[i]].append(g)
            every.append(g)
            mix[top[i]].update(inside)
    return gains, every, mix


def _horizon_effects(levels: Levels, h: int) -> dict[int, tuple[float, float]]:
    """Per kind at horizon ``h``: its effect (bytes per run, :func:`_unmix`) and the
    standard error of its difference of trimmed means; nothing from too few windows."""
    gains, every, mix = _horizon_gains(levels, h)
    if len(every) < 20:
        return {}
    mb, vb, nb = _trimmed(every)
    measured: dict[int, tuple[float, float]] = {}
    for kind, kind_gains in gains.items():
        if len(kind_gains) < 5:
            continue
        m, v, nk = _trimmed(kind_gains)
        measured[kind] = (m - mb, math.sqrt(v / nk + vb / nb))
    counts = {k: len(v) for k, v in gains.items()}
    return {
        kind: (effect, measured[kind][1]) for kind, effect in _unmix(measured, mix, counts).items()
    }


def _event_attribution(
    z: dict[int, float], estimates: dict[int, list[float]], runs: Counter[int], kinds: Kinds
) -> Attribution:
    """Bytes per run of each kind: the mean of its positive estimates, shrunk by (its
    evidence / the best kind's)²."""
    out: Attribution = {}
    best = max(z.values(), default=0.0)
    for kind, zs in z.items():
        positive = [e for e in estimates[kind] if e > 0]
        per_run = sum(positive) / len(positive) if zs > 0 and positive else 0.0
        per_run *= min(1.0, zs / best) ** 2 if best > 0 else 0.0
        out[kinds.names[kind]] = {
            "per_run_bytes": per_run,
            "growth_bytes": per_run * runs[kind],
            "runs": runs[kind],
            "evidence": zs,
        }
    return out


def _unmix(
    measured: dict[int, tuple[float, float]],
    mix: dict[int, Counter[int]],
    counts: dict[int, int],
) -> dict[int, float]:
    """Bytes per run of each measured kind, from the differences of means: kind ``k``'s
    windows grow ``diff[k] = Σ_j (mix[k][j] - mix[j]) β_j`` more than the average window,
    ``mix[k][j]`` the runs of ``j`` its windows hold on average, ``mix[j]`` all windows'.

    Where kinds come in random order the off-diagonal terms are about 0 and this is
    ``diff[k] / (1 - share_k)`` (what the study took alone before); where they come in
    turn, only the whole system says which kind made the growth. A constant added to every
    ``β`` fits as well (growth outside the kinds, drift): effects are measured from the
    lower median kind, which counts 0 (most kinds keep nothing; one noisy rare kind
    cannot set the zero). Least squares over the most measured kinds
    (:data:`MAX_KINDS`); the rest keep the diagonal estimate. A horizon whose windows
    all hold the same mix (a period that divides it) says nothing: no estimates."""
    total = sum(counts.values())
    if not measured or not total:
        return {}
    order = sorted(measured, key=lambda k: (-counts[k], k))
    diag = {k: measured[k][0] / max(1e-9, 1 - counts[k] / total) for k in order}
    if len(measured) < 2:
        return diag
    all_mix: Counter[int] = Counter()
    for c in mix.values():
        all_mix.update(c)
    avg = {j: c / total for j, c in all_mix.items()}
    solved = order[:MAX_KINDS]
    ref = min(solved, key=lambda k: (diag[k], k))
    cols = [k for k in solved if k != ref]
    a = [[mix[k].get(j, 0) / counts[k] - avg.get(j, 0.0) for j in cols] for k in solved]
    b = [measured[k][0] for k in solved]
    normal = [[sum(r[i] * r[j] for r in a) for j in range(len(cols))] for i in range(len(cols))]
    rhs = [sum(r[i] * y for r, y in zip(a, b, strict=True)) for i in range(len(cols))]
    beta = _solve(normal, rhs)
    if beta is None:
        return {}
    out = dict(zip(cols, beta, strict=True))
    out[ref] = 0.0
    zero = sorted(out.values())[(len(out) - 1) // 2]  # the lower median: most kinds keep 0
    out = {k: v - zero for k, v in out.items()}
    for k in order[MAX_KINDS:]:
        out[k] = diag[k]
    return out


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """``x`` with ``a x = b`` (Gaussian elimination, partial pivoting); None when ``a`` is
    singular (a pivot under 1e-6 of the largest entry)."""
    n = len(b)
    m = [[*row, y] for row, y in zip(a, b, strict=True)]
    scale = max((abs(v) for row in a for v in row), default=0.0)
    if scale == 0.0:
        return None
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-6 * scale:
            return None
        m[c], m[p] = m[p], m[c]
        pivot = m[c]
        for r in range(c + 1, n):
            f = m[r][c] / pivot[c]
            if f:
                row = m[r]
                for k in range(c, n + 1):
                    row[k] -= f * pivot[k]
    x = [0.0] * n
    for c in range(n - 1, -1, -1):
        x[c] = (m[c][n] - sum(m[c][k] * x[k] for k in range(c + 1, n))) / m[c][c]
    return x


def attribute_bloat(lives: list[Life], kinds: Kinds) -> Attribution:
    """Bytes each kind added to the sustained high-water mark, less what any kind adds by
    chance per run (the median kind's rate: noise lifts the mark in whichever job runs).

    Bloat rises in a few steps, in the job whose peak set the new mark, so the rise is
    credited to that job (a regression over windows spreads a few sparse steps over every
    kind that ran near them). Merged series bring the same credits, streamed as read."""
    growth: defaultdict[int, float] = defaultdict(float)
    runs: Counter[int] = Counter()
    together = [
        life for life in lives if life.jobs.exact and life.concurrency >= 1.5 and len(life.jobs)
    ]
    for life in lives:
        js = life.jobs
        if life in together:
            continue
        if js.exact:
            n = len(js.n)
            if n < 2:
                continue
            s = sustained(list(js.lo), window_for(n))
            top = s[0]
            for i, kind in enumerate(js.top):
                runs[kind] += 1
                if i and s[i] > top:
                    growth[kind] += s[i] - top
                top = max(top, s[i])
        elif life.stream is not None:
            for k, g in life.stream.growth.items():
                growth[k] += g
            runs.update(life.stream.runs)
    floor = median([growth[k] / runs[k] for k in runs]) if len(runs) > 2 else 0.0
    net = {k: max(0.0, growth[k] / runs[k] - floor) * runs[k] for k in runs}
    for k, (g, r) in _bloat_running(together).items():
        net[k] = net.get(k, 0.0) + g
        runs[k] += r
    out: Attribution = {}
    for k in runs:
        if runs[k]:
            out[kinds.names[k]] = {
                "per_run_bytes": net.get(k, 0.0) / runs[k],
                "growth_bytes": net.get(k, 0.0),
                "runs": runs[k],
            }
    return out


def _bloat_running(lives: list[Life]) -> dict[int, tuple[float, int]]:
    """Bloat where jobs run at once: each rise of the sustained high-water mark, between two
    job ends, is shared among the jobs running then (by how long each ran in it); a kind's
    growth is what it got beyond its share of all running time (what chance gives a kind
    that is running a lot). Returns kind id -> (net growth, runs)."""
    credit: defaultdict[int, float] = defaultdict(float)
    busy: defaultdict[int, float] = defaultdict(float)
    runs: Counter[int] = Counter()
    rose = 0.0
    for life in lives:
        js = life.jobs
        n = len(js.n)
        s = sustained(list(js.lo), window_for(n))
        top = s[0]
        for i in range(n):
            kind = js.top[i]
            runs[kind] += 1
            busy[kind] += max(0.0, js.ts[i] - js.start[i])
            if i and s[i] > top:
                rise = s[i] - top
                running = _running(life, i)
                total = sum(running.values())
                if total <= 0:
                    credit[kind] += rise
                else:
                    for k, w in running.items():
                        credit[k] += rise * w / total
                rose += rise
            top = max(top, s[i])
    time_all = sum(busy.values())
    out: dict[int, tuple[float, int]] = {}
    for k in runs:
        chance = rose * busy[k] / time_all if time_all > 0 else 0.0
        out[k] = (max(0.0, credit[k] - chance), runs[k])
    return out


def _running(life: Life, i: int) -> dict[int, float]:
    """Kind id -> seconds each kind ran between the ends of jobs ``i - 1`` and ``i``."""
    js = life.jobs
    t0, t1 = js.ts[i - 1], js.ts[i]
    out: defaultdict[int, float] = defaultdict(float)
    n = len(js.n)
    j = i
    while j < n and js.ts[j] - life.longest_s < t1 and j < i + 4096:
        start, end = js.start[j], js.ts[j]
        overlap = min(end, t1) - max(start, t0)
        if overlap > 0:
            out[js.top[j]] += overlap
        j += 1
    return out


def rank(attrib: Attribution) -> list[dict[str, Any]]:
    total = sum(max(0.0, v["growth_bytes"]) for v in attrib.values())
    out = []
    for kind, v in sorted(attrib.items(), key=lambda kv: -kv[1]["growth_bytes"]):
        if v["growth_bytes"] <= 0 or total <= 0:
            continue
        share = v["growth_bytes"] / total
        if share < 0.02:
            continue
        entry = {
            "job": kind,
            "growth_bytes": int(v["growth_bytes"]),
            "share": round(share, 3),
            "runs": int(v["runs"]),
            "per_run_bytes": int(v["per_run_bytes"]),
        }
        if "evidence" in v:  # the event study's z-score, summed over horizons
            entry["evidence"] = round(v["evidence"], 1)
        out.append(entry)
    return out


def _live_window(lives: list[Life]) -> int:
    """Jobs per window for live memory: 1 when jobs run one at a time, else about twice
    as many as run at once (a job's allocations spread over the ends of its neighbours)."""
    together = median([life.concurrency for life in lives]) if lives else 1.0
    return 1 if together < 1.5 else max(2, round(2 * together))


def suspects_of(pattern: str, lives: list[Life], kinds: Kinds, digest: Digest) -> list[Any]:
    """The ranked suspects for a pattern, whether live memory was used, and what the
    ranking rests on ("live memory", "rss", or None when there are no suspects)."""
    with_live = [life for life in _job_lives(lives) if life.live_known >= life.jobs.jobs]
    live_used = bool(with_live) and len(with_live) * 2 >= len(_job_lives(lives))
    basis = "rss"
    if pattern == "leak":
        attrib: Attribution = {}
        if live_used:
            attrib = attribute_windows(with_live, kinds, _live_window(with_live), live=True)
            attrib = _own_growth_confirms(attrib, digest)
            basis = "live memory" if rank(attrib) else "rss"
        exact = sum(life.jobs.jobs for life in lives if life.jobs.exact)
        if not rank(attrib) and exact * 2 >= sum(life.jobs.jobs for life in lives):
            attrib = attribute_events(lives, kinds)
        if not rank(attrib):
            attrib = attribute_windows(lives, kinds, attribution_window(lives, digest))
        if not rank(attrib):  # the regression found nothing: fall back to the high-water mark
            attrib = attribute_bloat(lives, kinds)
    elif pattern == "bloat":
        attrib = attribute_bloat(lives, kinds)
    else:
        attrib = {}
    ranked = rank(attrib)
    return [ranked, live_used, basis if ranked else None]


def _own_growth_confirms(attrib: Attribution, digest: Digest) -> Attribution:
    """Live memory's regression, less the kinds whose own jobs do not usually grow it: a
    kind that keeps memory keeps it inside its own runs, so the median change of live
    memory over them is positive (jobs that run beside them add noise both ways)."""
    medians = {name: s.live_median for name, s in zip(digest.kind_names, digest.kinds, strict=True)}
    out = {}
    for name, v in attrib.items():
        mid = medians.get(name)
        if mid is None or mid > 0.05 * v["per_run_bytes"]:
            out[name] = v
    return out


def leak_suspects(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The kinds a leak would be blamed on, whatever the verdict (``MEMWARDEN_TRACE=auto``)."""
    digest = Digest().add_all(records)
    lives = digest.finish()
    suspects, _, _ = suspects_of("leak", lives, Kinds(digest), digest)
    return suspects  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class Limits:
    """The limits a journal shows (bytes; None when it does not say)."""

    soft: float | None
    hard: float | None
    quota: float | None
    share: float | None  # a pool child's own limit

    @property
    def ceiling(self) -> float | None:
        """No limit may be raised to this or past it."""
        known = [v for v in (self.hard, self.quota) if v]
        return min(known) if known else None

    @property
    def ceiling_name(self) -> str:
        """What :attr:`ceiling` is: the hard limit, or the quota where it is lower or the
        journal shows no hard limit."""
        if self.hard and not (self.quota and self.quota < self.hard):
            return "hard limit"
        return "quota"

    def allows_soft(self, value: float) -> bool:
        ceiling = self.ceiling
        return ceiling is not None and value < ceiling


@dataclass
class Advice:
    text: str
    #: the soft limit this advice would set, checked against :class:`Limits`
    soft_to: float | None = None


def vet(advice: list[Advice], limits: Limits) -> list[str]:
    """The advice that survives the check: nothing raises a limit past the hard limit or
    the quota (or where neither is known)."""
    return [a.text for a in advice if a.soft_to is None or limits.allows_soft(a.soft_to)]


def _pace(
    pattern: str, shapes: list[Shape], lives: list[Life], limits: Limits
) -> dict[str, Any] | None:
    """How much, how fast, and how long from a fresh start to the limit at that pace: per
    process from its jobs; to the limit on the figure the limit is judged on (the whole
    worker's readings, where the journal has them; else a process against its share or the
    soft limit)."""
    mine = [sh for sh in shapes if sh.verdict == pattern]
    if pattern not in ("leak", "bloat") or not mine:
        return None
    out: dict[str, Any] = {
        "lifetimes": len(mine),
        "growth_per_lifetime_bytes": int(median([sh.growth_bytes for sh in mine])),
        "peak_bytes": int(max(sh.peak_bytes for sh in mine)),
    }
    if pattern == "leak":
        rates = [sh.tail_per_hour for sh in mine if sh.tail_per_hour]
        out["per_hour_bytes"] = int(median(rates)) if rates else None
        out["per_1000_jobs_bytes"] = int(median([sh.tail_slope for sh in mine]) * 1000)
    whole = [life for life in lives if life.samples.readings >= MIN_JOBS]
    if whole:
        figure = _worker_figure(max(whole, key=lambda life: life.samples.readings))
        limit, name = (limits.soft, "soft limit") if limits.soft else (limits.hard, "hard limit")
        out["figure"] = "the whole worker"
    else:
        by_pid = {life.pid: life for life in lives}
        last = max(mine, key=lambda sh: by_pid[sh.pid].last_ts if sh.pid in by_pid else 0)
        life = by_pid.get(last.pid)
        figure = (last.start_bytes, float(out["peak_bytes"]), out.get("per_hour_bytes"))
        limit, name = (limits.soft, "soft limit") if limits.soft else (limits.hard, "hard limit")
        if life is not None and life.share:
            limit, name = life.share, "pool child's share"
        out["figure"] = "a process"
    start, peak, per_hour = figure
    out.update({"limit_name": name, "limit_bytes": limit, "start_bytes": int(start)})
    if pattern == "leak":
        out["figure_per_hour_bytes"] = int(per_hour) if per_hour else None
        if limit and per_hour and per_hour > 0 and limit > start:
            out["seconds_from_start_to_limit"] = (limit - start) / per_hour * 3600
    elif limit:
        out["peak_under_limit_bytes"] = int(limit - peak)
        out["peak_bytes"] = int(peak)
    return out


def _worker_figure(life: Life) -> tuple[float, float, float | None]:
    """(start, peak, rise per hour over its life) of a lifetime's readings' total."""
    tot, ts = list(life.samples.tot), life.samples.ts
    n = len(tot)
    span = ts[-1] - ts[0] if n > 1 else 0.0
    per_hour = theil_sen(tot) * (n - 1) / span * 3600 if span > 0 else None
    return min(tot[: max(3, n // 10)]), max(tot), per_hour


def pace_words(pace: dict[str, Any] | None, pattern: str) -> str | None:
    if not pace:
        return None
    limit = pace.get("limit_bytes")
    if pattern == "leak":
        rate = pace.get("per_hour_bytes")
        text = (
            f"A process grows about {format_size(rate)} per hour" if rate else "A process grows"
        ) + f" ({format_size(pace['per_1000_jobs_bytes'])} per 1000 jobs)"
        if limit and "seconds_from_start_to_limit" in pace:
            text += (
                f"; at {format_size(pace['figure_per_hour_bytes'])} per hour, "
                f"{pace['figure']} goes from {format_size(pace['start_bytes'])} to its "
                f"{pace['limit_name']} ({format_size(limit)}) in about "
                f"{format_duration(pace['seconds_from_start_to_limit'])}"
            )
        return text + "."
    text = (
        f"Rises {format_size(pace['growth_per_lifetime_bytes'])} per lifetime; "
        f"{pace['figure']} levels off at about {format_size(pace['peak_bytes'])}"
    )
    if limit:
        under = pace["peak_under_limit_bytes"]
        text += (
            f", {format_size(under)} under its {pace['limit_name']} ({format_size(limit)})"
            if under > 0
            else f", over its {pace['limit_name']} ({format_size(limit)}) by {format_size(-under)}"
        )
    return text + "."


# ----------------------------------------------------------------------------- advice
def advise(
    pattern: str,
    suspects: list[dict[str, Any]],
    shapes: list[Shape],
    lives: list[Life],
    digest: Digest,
    limits: Limits,
) -> list[str]:
    reclaims = sum(life.reclaims for life in lives)
    freed = sum(life.freed for life in lives)
    kills = sum(life.kills for life in lives)
    out: list[Advice] = []
    if pattern == UNKNOWN:
        return []
    if pattern == "stable":
        spread = max((sh.peak_bytes - sh.start_bytes for sh in shapes), default=0.0)
        out.append(
            Advice(
                f"Nothing to do: memory stays level (sustained rise at most {format_size(spread)})."
            )
            if not (kills or digest.oom_kills)
            else Advice(
                f"Memory stays level between jobs (sustained rise at most "
                f"{format_size(spread)}), yet single jobs reach the limits: "
                f"{kills} kill(s), {digest.oom_kills} OOM kill(s)."
            )
        )
        out += _spike_advice(digest) if kills or digest.oom_kills else []
        return vet(out, limits)
    first = suspects[0]["job"] if suspects else None
    if pattern == "bloat":
        plateau = max(sh.peak_bytes for sh in shapes)
        if first:
            out.append(
                Advice(
                    f"{first} raises the high-water mark "
                    f"({format_size(suspects[0]['growth_bytes'])} over {suspects[0]['runs']} "
                    "runs): make its peak smaller (batches, streaming)."
                )
            )
        if reclaims:
            out.append(
                Advice(
                    f"Reclaim (gc + malloc_trim) freed {format_size(freed)} of the processes' "
                    f"RSS in {reclaims} reclaims (mean {format_size(freed / reclaims)}): keep "
                    "MEMWARDEN_RECLAIM on; it gets bloat back without a restart."
                )
            )
        else:
            out.append(
                Advice(
                    "Reclaim before restarting (MEMWARDEN_RECLAIM=true, the default): gc + "
                    "malloc_trim(0) gives glibc's free pages back without a restart."
                )
            )
        out += [
            Advice("On glibc with threads: MALLOC_ARENA_MAX=2 (fewer arenas, less fragmentation)."),
            Advice(
                "Or jemalloc with background purging: LD_PRELOAD=libjemalloc.so.2 "
                "MALLOC_CONF=background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"
            ),
        ]
        out.append(_soft_limit_advice(plateau, limits))
        return vet(out, limits)
    if first:
        per = suspects[0]["per_run_bytes"]
        maybe = (
            "; ranked on RSS with jobs at once, it may be a kind that runs beside it"
            if suspects[0].get("tentative")
            else ""
        )
        out.append(
            Advice(
                f"Profile {first} (about {format_size(per)} kept per run{maybe}): "
                f"MEMWARDEN_TRACE={first} runs tracemalloc around its next runs on one worker "
                "and writes `trace` records (file:line); or memray (`memray run -o job.bin "
                "<worker>`, or `memray attach PID`)."
            )
        )
    else:
        out.append(
            Advice(
                "Set MEMWARDEN_TRACE=auto: tracemalloc around the most-blamed kind on one worker."
            )
        )
    out.append(
        Advice(
            "Until it is fixed, restarts at the soft limit keep workers inside the quota; "
            "reclaim, allocator settings and a higher limit cannot help a leak."
        )
    )
    return vet(out, limits)


def _soft_limit_advice(plateau: float, limits: Limits) -> Advice:
    """A soft limit above the plateau — only where the hard limit (or quota) leaves room."""
    want = plateau * MARGIN
    if limits.allows_soft(want):
        if limits.soft is not None and limits.soft >= want:
            return Advice(
                f"Memory levels off at about {format_size(plateau)}, under the soft limit "
                f"({format_size(limits.soft)}): restarts come from spikes, not this plateau."
            )
        return Advice(
            f"Memory levels off at about {format_size(plateau)}: a soft limit of "
            f"{format_size(want)} (under the {limits.ceiling_name} "
            f"{format_size(limits.ceiling)}) "
            "avoids restarts that cannot help for long.",
            soft_to=want,
        )
    if limits.ceiling is None:
        return Advice(
            f"Memory levels off at about {format_size(plateau)}: if the quota leaves room "
            f"for a soft limit of {format_size(want)} below the hard limit, that avoids "
            "restarts that cannot help for long; this journal does not show the limits."
        )
    return Advice(
        f"Memory levels off at about {format_size(plateau)}, too close to the "
        f"{limits.ceiling_name} ({format_size(limits.ceiling)}) for a soft limit above it: "
        "make the peak smaller, "
        "or give the worker a bigger quota."
    )


def _spike_advice(digest: Digest) -> list[Advice]:
    stats = sorted(
        ((s.biggest, name) for name, s in zip(digest.kind_names, digest.kinds, strict=True)),
        reverse=True,
    )
    if not stats or stats[0][0] <= 0:
        return []
    size, name = stats[0]
    return [
        Advice(
            f"{name} grows its process by up to {format_size(size)} within one job: make its "
            "peak smaller (batches, streaming), or run it where the quota is bigger."
        )
    ]


# ----------------------------------------------------------------------------- analysis
@dataclass
class Analysis:
    """One computation of a journal, for ``diagnose``, ``report`` and tests."""

    result: dict[str, Any]
    lives: list[Life]
    digest: Digest
    shapes: list[Shape] = field(default_factory=list)


def analyse(
    records: Iterable[Any],
    summary: ReadSummary | None = None,
    skipped_lines: int = 0,
    validated: bool = False,
) -> Analysis:
    """Read ``records`` once and judge them. ``validated``: they come from
    :func:`memwarden.analysis.read.read_journals`, which has checked each one."""
    digest = Digest(validate=not validated).add_all(records)
    return judge(digest, summary, skipped_lines)


def analyse_files(paths: Iterable[str], summary: ReadSummary) -> Analysis:
    """Read journal files once (:meth:`Digest.read`: no record handed on twice) and judge
    them; what reading met goes into ``summary``. What :func:`analyse` over
    :func:`read_journals` gives, faster."""
    return judge(Digest().read(paths, summary), summary)


def judge(digest: Digest, summary: ReadSummary | None, skipped_lines: int = 0) -> Analysis:
    """The verdict over a journal's digest."""
    lives = digest.finish()
    kinds = Kinds(digest)
    shapes = [sh for sh in (shape_of(life) for life in lives) if sh is not None]
    pattern, confidence = vote(shapes)
    suspects, live_used, basis = suspects_of(pattern, lives, kinds, digest)
    for s in suspects:
        if s["job"] in digest.traces:
            s["trace"] = digest.traces[s["job"]]
    attribution = _attribution(pattern, basis, lives)
    if attribution["caveat"]:
        for s in suspects:
            s["tentative"] = True
    limits = Limits(digest.soft, digest.hard, digest.quota, digest.share)
    jobs = sum(life.jobs.jobs for life in lives)
    readings = sum(life.samples.readings for life in lives)
    notes = _notes(lives, live_used, jobs, shapes, digest)
    pace = _pace(pattern, shapes, lives, limits)
    evidence = {
        "lifetimes": len(lives),
        "lifetimes_with_jobs": sum(1 for life in lives if life.jobs.jobs),
        "jobs": jobs,
        "readings": readings,
        "kinds": sum(1 for s in digest.kinds if s.runs),
        "verdicts": dict(Counter(sh.verdict for sh in shapes)),
        "live_memory": live_used,
        "attribution": attribution,
        "reclaims": sum(life.reclaims for life in lives),
        "reclaimed_bytes": int(sum(life.freed for life in lives)),
        "restarts": sum(life.restarts for life in lives),
        "recycles": sum(life.recycles for life in lives),
        "kills": sum(life.kills for life in lives),
        "oom_kills": digest.oom_kills,
        "pauses": digest.pauses,
        "limits": {k: v for k, v in vars(limits).items() if v},
        "restart_reasons": [_group(g) for g in _groups(digest.reasons)],
        "shapes": [sh.as_dict() for sh in sorted(shapes, key=lambda sh: -sh.jobs)[:20]],
        "traces": {k: v for k, v in digest.traces.items() if k not in {s["job"] for s in suspects}},
    }
    result = {
        "pattern": pattern,
        "confidence": confidence,
        "suspects": suspects,
        "pace": pace,
        "notes": notes,
        "advice": advise(pattern, suspects, shapes, lives, digest, limits),
        "kinds": kind_table(digest, suspects),
        "skipped_lines": skipped_lines + (summary.bad if summary is not None else 0),
        "skipped_records": digest.invalid,
        "input": summary.as_dict() if summary is not None else None,
        "evidence": evidence,
    }
    if pattern == UNKNOWN:
        result["nothing"] = _nothing(summary, jobs, readings, digest.invalid + skipped_lines)
    return Analysis(result, lives, digest, shapes)


def diagnose(records: Iterable[Any], skipped_lines: int = 0) -> dict[str, Any]:
    """The verdict over journal records: pattern, confidence, suspects, advice, evidence."""
    return analyse(records, skipped_lines=skipped_lines).result


def _notes(
    lives: list[Life], live_used: bool, jobs: int, shapes: list[Shape], digest: Digest
) -> list[str]:
    notes = []
    if digest.oom_kills:
        notes.append(
            f"The kernel OOM-killed {digest.oom_kills} process(es): the warden acted too late "
            "there (lower MEMWARDEN_SOFT_LIMIT / MEMWARDEN_HARD_LIMIT)."
        )
    if not jobs and lives:
        notes.append("No job records: verdict on the process only.")
    partial = sum(life.live_partial for life in lives)
    known = sum(life.live_known for life in lives)
    if jobs and not live_used:
        if partial:
            why = (
                "the figures in this journal miss what malloc serves by mmap (blocks of "
                "128 KiB and more)"
            )
        elif known:
            why = (
                f"recorded for {known} of {jobs} jobs only (turned off where a read cost "
                "over 1% of the mean job time)"
            )
        else:
            why = "not recorded (MEMWARDEN_LIVE_MEMORY off, or not on this path)"
        notes.append(f"Live memory: {why}: verdict on RSS alone.")
    forked = [life for life in lives if life.forked]
    if forked:
        notes.append(
            f"Jobs ran in forked work horses ({sum(life.jobs.jobs for life in forked)} jobs "
            f"of {len(forked)} worker(s)): a horse's own growth ends with it; the verdict is on "
            "the worker that forks them, at the level each horse started from."
        )
    if any(life.run for life in lives):
        notes.append(
            "memwarden run: its readings are judged on the command's own figure (their "
            "total), never on the supervisor's RSS."
        )
    together = [life.concurrency for life in lives if life.jobs.jobs >= MIN_JOBS]
    if together and max(together) >= 1.5:
        notes.append(
            f"Jobs ran concurrently (up to {max(together):.1f} at once): attributed over "
            "windows of jobs, never per job."
        )
    if any(sh.warmup for sh in shapes):
        notes.append(
            "A warm-up of a few MiB that levels off (arenas, caches filled once) is stable."
        )
    return notes


def _attribution(pattern: str, basis: str | None, lives: list[Life]) -> dict[str, Any]:
    """What the suspect ranking rests on, and the caveat where it may name a neighbour: a
    leak ranked on RSS alone while jobs ran at once. Memory a job keeps shows in the
    records of the jobs that end while it runs, and a pool taking kinds in turn puts the
    same neighbours beside it every time: no rule over RSS records alone can tell whether
    the growth came at a job's start or its end (issue 14). Live memory can."""
    together = max((life.concurrency for life in _job_lives(lives)), default=1.0)
    caveat = None
    if pattern == "leak" and basis == "rss" and together >= 1.5:
        caveat = (
            f"Suspects ranked on RSS alone with jobs running at once (up to {together:.1f}): "
            "memory one job keeps shows in the records of the jobs that end while it runs, "
            "so the first suspect may be a neighbour of the kind that keeps it. Live-memory "
            "figures in the job records (MEMWARDEN_LIVE_MEMORY, glibc malloc or jemalloc) "
            "tell them apart."
        )
    return {"basis": basis, "jobs_at_once": round(together, 1), "caveat": caveat}


def _nothing(summary: ReadSummary | None, jobs: int, readings: int, bad: int) -> str:
    if summary is not None and summary.records == 0:
        if summary.lines == 0:
            return "nothing to diagnose: the journal is empty"
        return (
            f"nothing to diagnose: none of the {summary.lines} line(s) is a journal record "
            "(is it a memwarden journal?)"
        )
    if not jobs and not readings:
        return "nothing to diagnose: no job or sample records" + (
            f" ({bad} unusable)" if bad else ""
        )
    return (
        f"nothing to diagnose: too few readings to judge ({jobs} jobs, {readings} readings; "
        f"at least {MIN_JOBS} in one process lifetime)"
    )


def kind_table(digest: Digest, suspects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per job kind: runs, growth attributed (the suspects'), RSS growth seen inside its
    own jobs, the biggest rise in one job, mean time."""
    attributed = {s["job"]: s for s in suspects}
    rows: list[dict[str, Any]] = []
    for name, s in zip(digest.kind_names, digest.kinds, strict=True):
        if not s.runs:
            continue
        blamed = attributed.get(name)
        rows.append(
            {
                "job": name,
                "runs": s.runs,
                "attributed_bytes": blamed["growth_bytes"] if blamed else 0,
                "share": blamed["share"] if blamed else 0.0,
                "seen_bytes": int(s.seen),
                "biggest_bytes": int(s.biggest),
                "mean_s": s.seconds / s.runs,
            }
        )
    rows.sort(key=lambda r: (-r["attributed_bytes"], -r["seen_bytes"]))
    return rows


def _groups(reasons: dict[tuple[str, str], ReasonGroup]) -> list[ReasonGroup]:
    return sorted(reasons.values(), key=lambda g: -g.count)


def _group(g: ReasonGroup) -> dict[str, Any]:
    return {
        "cause": g.cause,
        "action": g.action,
        "count": g.count,
        "low_bytes": g.low,
        "high_bytes": g.high,
        "limit_bytes": g.limit,
        "last_reason": g.last,
    }


# ----------------------------------------------------------------------------- input / CLI
def load(paths: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
    """Records of the given journal files (``-`` stdin; gzip by content), bad-line count.
    For small journals and tests: :func:`analyse` over :func:`read_journals` streams."""
    summary = ReadSummary()
    records = list(read_journals(paths, summary))
    return records, summary.bad


def verdict_text(result: dict[str, Any]) -> str:
    """The verdict as ``memwarden diagnose`` prints it (``result``: :func:`diagnose`'s)."""
    ev = result["evidence"]
    pattern = result["pattern"]
    lines = [
        f"Verdict: {pattern.upper()} (confidence {result['confidence']:.2f}) "
        f"over {ev['jobs']} jobs in {ev['lifetimes']} process lifetime(s), "
        f"{ev['kinds']} job kinds" + ("; live-memory figures used" if ev["live_memory"] else ""),
    ]
    pace = pace_words(result.get("pace"), pattern)
    if pace:
        lines.append(pace)
    lines += result.get("notes", [])
    shapes = ev["shapes"]
    if shapes:
        sh = shapes[0]
        what = "jobs" if sh["source"] == "jobs" else "readings"
        lines.append(
            f"Longest lifetime (pid {sh['pid']}, {sh['jobs']} {what}): "
            f"{format_size(sh['start_bytes'])} -> {format_size(sh['end_bytes'])}, "
            f"last-half slope {format_size(sh['tail_slope'])}/{what[:-1]}, "
            f"top-3 steps {sh['step_share']:.0%} of the rise, "
            f"plateau {sh['plateau_jobs']} {what}"
        )
    if result["suspects"]:
        lines += ["", f"{'job kind':<32} {'growth':>10} {'share':>6} {'runs':>7} {'per run':>10}"]
        for s in result["suspects"]:
            lines.append(
                f"{s['job'][:32]:<32} {format_size(s['growth_bytes']):>10} {s['share']:>6.0%} "
                f"{s['runs']:>7} {format_size(s['per_run_bytes']):>10}"
            )
            for t in s.get("trace", [])[:5]:
                lines.append(
                    f"    {t.get('where')}: +{format_size(t.get('bytes'))} "
                    f"({t.get('count')} blocks)  {t.get('code') or ''}".rstrip()
                )
        caveat = ev.get("attribution", {}).get("caveat")
        if caveat:
            lines.append(f"Caution: {caveat}")
    if ev["restart_reasons"]:
        lines += ["", "Restarts, recycles and kills:"]
        for g in ev["restart_reasons"]:
            lines.append(f"- {g['count']} x {g['action']}: {g['cause']}")
    lines += ["", "Advice:"] + [f"- {a}" for a in result["advice"]]
    skipped = result["skipped_lines"] + result.get("skipped_records", 0)
    if skipped and result.get("input") is None:
        lines.append(f"({skipped} malformed or truncated lines/records skipped)")
    return "\n".join(lines)
