"""``memwarden check``: what the warden sees here, and what is wrong with it."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import click

from memwarden import fleet, reclaim, state
from memwarden.config import Config
from memwarden.gauges.pressure import Signals
from memwarden.restart import heroku, kubernetes
from memwarden.setup import set_up
from memwarden.units import SettingError, format_size


def django_checks(config: Config, env: Mapping[str, str]) -> list[str]:
    """With ``DJANGO_SETTINGS_MODULE`` set and Django Tasks' database backend installed: the
    project's settings that can leave a task unrun (``memwarden.django``)."""
    if not env.get("DJANGO_SETTINGS_MODULE") or importlib.util.find_spec("django_tasks_db") is None:
        return []
    try:
        from memwarden.integrations.django import checks_from_env

        return checks_from_env(config, env)
    except Exception as exc:
        return [f"django: cannot load the settings {env['DJANGO_SETTINGS_MODULE']!r}: {exc}"]


#: Extra checks (platform, framework): each gets (config, env) and returns warning strings.
EXTRA_CHECKS: list[Callable[[Config, Mapping[str, str]], list[str]]] = [
    heroku.checks,
    kubernetes.checks,
    fleet.checks,
    django_checks,
]


def inspect(env: Mapping[str, str] | None = None, **overrides: Any) -> dict[str, Any]:
    """Everything ``check`` reports, as one dict (sizes in bytes). Raises SettingError."""
    env = os.environ if env is None else env
    config = Config.from_env(env, **overrides)
    setup = set_up(config, env)
    cgroup, quota, limits = setup.cgroup, setup.quota, setup.limits
    gauge = setup.gauge(config)
    reading = gauge.read()
    warnings: list[str] = []
    if not limits.enabled:
        warnings.append("no quota and no limit: the guard is off (set MEMWARDEN_SOFT_LIMIT)")
    if limits.soft is not None and reading.total >= limits.soft:
        warnings.append(
            f"already over the soft limit ({format_size(reading.total)} >= "
            f"{format_size(limits.soft)}): a restart cannot help"
        )
    alloc = reclaim.allocator()
    if alloc["name"] == "glibc" and not alloc["malloc_arena_max"]:
        warnings.append("MALLOC_ARENA_MAX is not set: threaded workers fragment more (try 2)")
    where = state.locate(config.state_dir, env)
    unusable = state.problem_of(where.path)
    if where.problem:
        warnings.append(f"state dir: {where.problem}")
    if unusable:
        warnings.append(
            f"state dir {where.path}: {unusable}: restarts go on without the host lock and "
            "the restart history (fix it, or set MEMWARDEN_STATE_DIR)"
        )
    for extra in EXTRA_CHECKS:
        warnings.extend(extra(config, env))
    report: dict[str, Any] = {
        "platform": quota.platform,
        "quota": quota.limit,
        "quota_source": quota.source,
        "gauge": gauge.source,
        "reading": reading.total,
        "rss": reading.rss,
        "allocator": alloc,
        "soft_limit": limits.soft,
        "hard_limit": limits.hard,
        "grace_s": limits.grace,
        "shutdown_timeout_s": config.shutdown_timeout,
        "interval_s": config.interval,
        "reclaim": limits.reclaim,
        "restart": config.restart,
        "dry_run": config.dry_run,
        "journal": config.journal,
        "state_dir": where.path,
        "state_source": where.source,
        "warnings": warnings,
    }
    if cgroup is not None:
        mem = cgroup.read()
        report["cgroup"] = {
            "version": mem.version,
            "path": cgroup.path,
            "usage": mem.usage,
            "working_set": mem.working_set,
            "anon": mem.anon,
            "inactive_file": mem.inactive_file,
            "limit": mem.limit,
            "oom_kills": mem.oom_kills,
        }
    signals = Signals(cgroup)
    psi = signals.pressure()
    report["pressure"] = (
        None
        if psi is None
        else {
            "source": psi.source,
            "path": psi.path,
            "some": list(psi.some),
            "full": list(psi.full),
            "some_total_us": psi.some_total,
            "full_total_us": psi.full_total,
        }
    )
    report["memory_events"] = signals.events()
    return report


def render(report: Mapping[str, Any]) -> str:
    """The human form of :func:`inspect`."""
    alloc = report["allocator"]
    lines = [
        f"platform      {report['platform']}",
        f"quota         {format_size(report['quota'])}  ({report['quota_source']})",
        f"gauge         {report['gauge']}: {format_size(report['reading'])} now",
        f"soft limit    {format_size(report['soft_limit'])}  (grace {report['grace_s']:g}s)",
        f"hard limit    {format_size(report['hard_limit'])}",
        f"reclaim       {'on' if report['reclaim'] else 'off'}",
        f"restart       {report['restart']}  (shutdown timeout {report['shutdown_timeout_s']:g}s)"
        + ("  DRY RUN" if report["dry_run"] else ""),
        f"allocator     {alloc['name']}"
        + (f" {alloc['glibc']}" if alloc["glibc"] else "")
        + f", MALLOC_ARENA_MAX={alloc['malloc_arena_max'] or 'unset'}",
        f"journal       {report['journal'] or 'off'}",
        f"state dir     {report['state_dir']}  ({report['state_source']})",
    ]
    if "cgroup" in report:
        cg = report["cgroup"]
        lines.append(
            f"cgroup        v{cg['version']} {cg['path']}: working set "
            f"{format_size(cg['working_set'])}, usage {format_size(cg['usage'])}, "
            f"limit {format_size(cg['limit'])}, oom kills {cg['oom_kills']}"
        )
    psi = report.get("pressure")
    if psi:
        avgs = "  ".join(
            f"{kind} " + "/".join(f"{v:.2f}" for v in psi[kind]) for kind in ("some", "full")
        )
        lines.append(f"pressure      {avgs} %  (avg10/60/300, {psi['source']}: {psi['path']})")
    else:
        lines.append("pressure      not kept by this kernel (no PSI file)")
    events = report.get("memory_events")
    if events:
        lines.append("mem events    " + ", ".join(f"{k} {v}" for k, v in events.items()))
    lines += [f"warning       {w}" for w in report["warnings"]]
    return "\n".join(lines)


def _taskiq_broker(ctx: click.Context, param: click.Parameter, spec: str | None) -> None:
    """``--taskiq-broker``: the broker's no-loss settings, checked beside the rest."""
    if not spec:
        return
    try:
        integration = importlib.import_module("memwarden.integrations.taskiq")
        EXTRA_CHECKS.append(integration.check_app(spec))
    except Exception as exc:
        raise click.BadParameter(f"cannot load Taskiq broker {spec!r}: {exc}") from exc


def _procrastinate_app(ctx: click.Context, param: click.Parameter, spec: str | None) -> None:
    """``--procrastinate-app``: the app's no-loss settings, checked beside the rest."""
    if not spec:
        return
    try:
        integration = importlib.import_module("memwarden.integrations.procrastinate")
        EXTRA_CHECKS.append(integration.check_app(spec))
    except Exception as exc:
        raise click.BadParameter(f"cannot load Procrastinate app {spec!r}: {exc}") from exc


@click.command()
@click.option(
    "--procrastinate-app",
    metavar="MODULE.APP",
    expose_value=False,
    callback=_procrastinate_app,
    help="Also check a Procrastinate app's no-loss settings: the guard, "
    "shutdown_graceful_timeout, the heartbeat (default: none).",
)
@click.option(
    "--taskiq-broker",
    metavar="MODULE:BROKER",
    expose_value=False,
    callback=_taskiq_broker,
    help="Also check a Taskiq broker's no-loss settings: its kind, consumer_id, "
    "idle_timeout (default: none).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object, sizes in bytes (default: text for people).",
)
@click.option(
    "--celery-app",
    metavar="MODULE:APP",
    help="Also check a Celery app's no-loss settings: acks_late, reject_on_worker_lost "
    "(default: none).",
)
def check(as_json: bool, celery_app: str | None) -> None:
    """Print what memwarden sees here: platform, quota, gauge (what memory is measured, and
    its reading now), limits, allocator. Settings are read from MEMWARDEN_* variables."""
    from memwarden.cli import fail_on_setting

    if celery_app:
        try:
            integration = importlib.import_module("memwarden.integrations.celery")
            EXTRA_CHECKS.append(integration.check_app(celery_app))
        except Exception as exc:
            click.echo(f"memwarden: cannot load Celery app {celery_app!r}: {exc}", err=True)
            sys.exit(2)
    try:
        report: dict[str, Any] = inspect()
    except SettingError as exc:
        fail_on_setting(exc)
        return
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
