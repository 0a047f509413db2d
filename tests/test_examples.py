"""examples/ is checked against the code: setting names and values, command lines parsed by
the real click commands (memwarden's and Celery's), the Heroku app with ``memwarden check``,
and the Kubernetes Role against the API calls the pod eviction really makes."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import click
import pytest

from conftest import IN_CI
from fakeapi import FakeAPI, Fallback, Reply
from memwarden.cli import main as memwarden_cli
from memwarden.config import Config, settings_table
from memwarden.gauges.quota import HEROKU_DYNO_SIZES
from memwarden.restart import make_restarter
from memwarden.restart.kubernetes import PodDeleter
from memwarden.units import SettingError, parse_duration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HEROKU = EXAMPLES / "heroku"
DEPLOYMENT = EXAMPLES / "kubernetes" / "worker.yaml"
UNIT = EXAMPLES / "systemd" / "memwarden-worker.service"
MEMWARDEN_VAR = re.compile(r"\bMEMWARDEN_[A-Z0-9_]+\b")
CONFIG_FIELDS = {f.name for f in dataclasses.fields(Config)}


def settings() -> set[str]:
    """The env var of every setting: the column the README's table is made from."""
    return {row[0] for row in settings_table()}


def memwarden_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("MEMWARDEN_")}


# ----------------------------------------------------------------- commands
def subcommand(group: click.Group, argv: list[str], obj: Any = None) -> tuple[str, dict[str, Any]]:
    """Parse ``argv`` with ``group`` and its subcommand, as the shell would hand it over;
    returns the subcommand's name and its parsed parameters. Nothing runs."""
    ctx = group.make_context(argv[0], list(argv[1:]))
    ctx.obj = obj
    with warnings.catch_warnings():  # click 8.2-8.x: protected_args; click 9: all in args
        warnings.simplefilter("ignore", DeprecationWarning)
        rest = [*getattr(ctx, "protected_args", ()), *ctx.args]
    name, command, args = group.resolve_command(ctx, rest)
    assert name is not None and command is not None, argv
    return name, command.make_context(name, args, parent=ctx).params


def check_celery(argv: list[str]) -> dict[str, Any]:
    """``celery … worker …`` parsed by Celery's own click commands; returns the worker's."""
    from celery import Celery
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery

    assert Path(argv[0]).name == "celery", argv
    # The worker's option defaults are read from an app; any app serves for parsing.
    app = Celery("parse", set_as_current=False)
    name, params = subcommand(celery, argv, CLIContext(app=app, no_color=True, workdir=None))
    assert name == "worker", f"{argv}: not a celery worker"
    return params


def check_command(argv: list[str], env: dict[str, str]) -> None:
    """A worker command of an example: ``memwarden run [OPTIONS] -- CMD`` or ``celery``.

    Options are parsed by ``memwarden run``'s click command (as the shell hands them over)
    and their values validated as settings, over the example's own environment.
    """
    if Path(argv[0]).name == "celery":
        check_celery(argv)
        return
    assert Path(argv[0]).name == "memwarden", f"{argv}: neither memwarden nor celery"
    name, params = subcommand(memwarden_cli, argv)
    assert name == "run", argv
    inner = list(params["command"])
    # run takes an unknown option for the command's start; its own check refuses it.
    assert not inner[0].startswith("-"), f"{argv}: unknown option {inner[0]}"
    assert argv[len(argv) - len(inner) - 1] == "--", f"{argv}: CMD after `--`"
    given = {k: v for k, v in params.items() if k in CONFIG_FIELDS and v is not None}
    Config.from_env(memwarden_env(env), **given)
    if params["max_early_exits"] is not None:
        assert int(params["max_early_exits"]) >= 1
    check_command(inner, env)


def test_the_command_check_refuses_what_run_and_celery_refuse() -> None:
    """The checker itself: each of these is a mistake an example could make."""
    env = {"MEMWARDEN_SOFT_LIMIT": "85%"}
    good = ["memwarden", "run", "--grace", "2m", "--", "celery", "-A", "proj", "worker"]
    check_command(good, env)
    bad_option = ["memwarden", "run", "--soft-limt", "1GB", "--", "celery", "-A", "p", "worker"]
    with pytest.raises(AssertionError, match="unknown option --soft-limt"):
        check_command(bad_option, env)
    with pytest.raises(SettingError, match="MEMWARDEN_GRACE"):
        check_command(["memwarden", "run", "--grace", "soon", "--", *good[-4:]], env)
    with pytest.raises(click.UsageError, match="--concurency"):
        check_command(["celery", "-A", "proj", "worker", "--concurency", "2"], env)


def test_every_memwarden_variable_named_in_examples_is_a_setting() -> None:
    known = settings()
    files = [p for p in EXAMPLES.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 7, files
    named = {
        (p.relative_to(EXAMPLES), m) for p in files for m in MEMWARDEN_VAR.findall(p.read_text())
    }
    assert len({m for _, m in named}) >= 8  # the examples do set memwarden's settings
    unknown = sorted(f"{path}: {name}" for path, name in named if name not in known)
    assert not unknown, f"not settings (renamed? see memwarden.config.Config): {unknown}"


# ----------------------------------------------------------------- Heroku
def procfile() -> dict[str, list[str]]:
    """Process type -> argv; the commented alternative (``# worker: …``) too."""
    found: dict[str, list[str]] = {}
    for n, line in enumerate((HEROKU / "Procfile").read_text().splitlines(), 1):
        m = re.match(r"^(#\s*)?([A-Za-z0-9_-]+):\s*(\S.*)$", line)
        if m:
            found[f"{m[2]}{' (commented)' if m[1] else ''} line {n}"] = shlex.split(m[3])
    return found


def app_json() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((HEROKU / "app.json").read_text())
    return data


def app_env() -> dict[str, str]:
    return {k: v["value"] for k, v in app_json()["env"].items() if "value" in v}


def test_app_json_keeps_to_the_app_json_schema() -> None:
    app = app_json()
    top = {"name", "description", "keywords", "website", "repository", "logo", "success_url"}
    top |= {"scripts", "env", "formation", "addons", "buildpacks", "environments", "stack"}
    assert set(app) <= top | {"image"}
    for name, var in app["env"].items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), name
        assert set(var) <= {"description", "value", "required", "generator"}, name
        assert isinstance(var.get("value", ""), str), f"{name}: a value is a string"
        assert "value" in var or var.get("required") or "generator" in var, name
    assert app["env"]["HEROKU_API_TOKEN"] == {
        "description": app["env"]["HEROKU_API_TOKEN"]["description"],
        "required": True,
    }, "the token is asked for at set-up, never given a value here"


def test_app_json_settings_are_valid_and_match_the_formation() -> None:
    env = app_env()
    config = Config.from_env(memwarden_env(env))
    assert config.restart == "heroku"
    assert config.shutdown_timeout < 30, "Heroku's SIGKILL comes 30 s after its SIGTERM"
    processes = {key.split()[0] for key in procfile() if "commented" not in key}
    formation = app_json()["formation"]
    assert set(formation) <= processes, "a formation entry is a process type of the Procfile"
    sizes = {entry["size"] for entry in formation.values()}
    assert sizes <= set(HEROKU_DYNO_SIZES)
    assert {config.dyno_size} == sizes, "MEMWARDEN_DYNO_SIZE is the formation's dyno size"


def test_procfile_commands_parse() -> None:
    lines = procfile()
    assert any("commented" not in k for k in lines) and any("commented" in k for k in lines)
    for where, argv in lines.items():
        try:
            check_command(argv, app_env())
        except Exception as exc:
            raise AssertionError(f"Procfile {where}: {exc}") from exc


def test_the_heroku_app_passes_memwarden_check(tmp_path: Path) -> None:
    """``memwarden check --celery-app`` on the example app, with app.json's config vars: the
    settings load, the guard accepts them, and the app has every no-loss setting."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **app_env(),
        "REDIS_URL": "redis://127.0.0.1:6379/15",  # a URL only: nothing connects
        "HEROKU_APP_NAME": "shop",
        "DYNO": "worker.1",
        "HEROKU_API_TOKEN": "example-token",
        "MEMWARDEN_STATE_DIR": str(state),
        "PYTHONDONTWRITEBYTECODE": "1",  # leave examples/ as it is
    }
    memwarden = [sys.executable, "-c", "from memwarden.cli import main; main()"]
    done = subprocess.run(
        [*memwarden, "check", "--json", "--celery-app", "proj.celery:app"],
        cwd=HEROKU,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["restart"] == "heroku"
    # Warnings that depend on the machine the test runs on, not on the example:
    machine = ("already over the soft limit", "no quota and no limit")
    mine = [w for w in report["warnings"] if not w.startswith(machine)]
    assert mine == [w for w in mine if "come back after visibility_timeout" in w], mine


# ----------------------------------------------------------------- Kubernetes
def yaml_documents(path: Path) -> list[Any]:
    """The documents of a YAML file: PyYAML when installed, else Ruby's Psych (CI installs
    Ruby with Sidekiq). Both read YAML 1.1, as kubectl does: an unquoted true is a bool."""
    try:
        yaml = importlib.import_module("yaml")
    except ImportError:
        ruby = shutil.which("ruby")
        if ruby is None:
            message = "no YAML parser: neither PyYAML nor ruby is installed"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
        script = "puts JSON.generate(YAML.load_stream(File.read(ARGV[0])))"
        out = subprocess.run(
            [ruby, "-ryaml", "-rjson", "-e", script, str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        documents: list[Any] = json.loads(out)
        return documents
    return list(yaml.safe_load_all(path.read_text()))


def manifest() -> dict[str, Any]:
    by_kind: dict[str, Any] = {}
    for doc in yaml_documents(DEPLOYMENT):
        assert doc["kind"] not in by_kind, f"one {doc['kind']} in the example"
        by_kind[doc["kind"]] = doc
    return by_kind


def pod_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet sets it (the downward API filled in)."""
    fields = {"metadata.name": "worker-5d8f7c9b4-x2x7q", "metadata.namespace": "jobs"}
    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            assert isinstance(var["value"], str), f"{var['name']}: quote it, env values are strings"
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def rbac_rule(method: str, path: str) -> tuple[str, str, str]:
    """(apiGroup, resource, verb) that RBAC checks for one request of a namespaced object."""
    m = re.fullmatch(
        r"/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/[^/]+/"
        r"(?P<resource>[^/]+)/[^/]+(?:/(?P<sub>[^/]+))?",
        path,
    )
    assert m, f"not a namespaced object's path: {path}"
    verbs = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    resource = m["resource"] + (f"/{m['sub']}" if m["sub"] else "")
    return (m["group"] or "", resource, verbs[method])


def test_the_deployment_gives_memwarden_what_it_reads() -> None:
    kinds = manifest()
    assert set(kinds) == {
        "Deployment",
        "PodDisruptionBudget",
        "ServiceAccount",
        "Role",
        "RoleBinding",
    }
    deployment = kinds["Deployment"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = pod_env(container)
    config = Config.from_env(memwarden_env(env))
    assert config.restart == "kubernetes" and config.kubernetes_delete_pod
    assert container["resources"]["limits"]["memory"], "the limit is memwarden's quota"
    assert pod["spec"]["terminationGracePeriodSeconds"] > config.shutdown_timeout
    assert pod["spec"].get("automountServiceAccountToken", True), "the eviction needs the token"
    check_command(container["command"] + container.get("args", []), env)
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    budget = kinds["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items(), "the budget selects it"
    assert budget.get("maxUnavailable", 1) not in (0, "0%"), "0 refuses every eviction"


def test_the_role_grants_exactly_the_calls_the_pod_eviction_makes(tmp_path: Path) -> None:
    """The restarter runs against a local API server with the Deployment's settings; the
    requests it sends are the RBAC rules needed, and the Role grants those and no more."""
    kinds = manifest()
    pod = kinds["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = pod_env(container)
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text("example-token")
    with FakeAPI() as api:
        api.script(Reply(201, {"kind": "Eviction"}))
        config = Config.from_env(
            memwarden_env(env), kubernetes_api_url=api.url, kubernetes_sa_dir=str(sa_dir)
        )
        assert isinstance(make_restarter(config), PodDeleter)

        fallback = Fallback()
        deleter = PodDeleter.from_env(config, env, fallback)
        assert deleter.problems() == []
        deleter.restart("example")
        assert fallback.calls == [], "the pod eviction succeeded"
        needed = {rbac_rule(r.method, r.path.partition("?")[0]) for r in api.requests}
    assert needed, "the restarter made its API call"
    role = kinds["Role"]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == needed, f"the Role grants {granted}; memwarden needs {needed}"
    binding = kinds["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    account = kinds["ServiceAccount"]["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert pod["spec"]["serviceAccountName"] == account


def test_rbac_rules_of_request_paths() -> None:
    pod = "/api/v1/namespaces/jobs/pods/w-1"
    assert rbac_rule("POST", pod + "/eviction") == ("", "pods/eviction", "create")
    assert rbac_rule("DELETE", pod) == ("", "pods", "delete")
    assert rbac_rule("GET", "/apis/apps/v1/namespaces/j/deployments/w") == (
        "apps",
        "deployments",
        "get",
    )


# ----------------------------------------------------------------- systemd
def unit() -> dict[str, list[str]]:
    """``Section.Key`` -> its values, in order (a key may repeat, as Environment= does)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep and not value.endswith("\\"), f"unit line: {line}"
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


def no_specifiers(value: str) -> str:
    """systemd expands %-specifiers in these values: a literal % is written %%."""
    assert "%" not in value.replace("%%", ""), f"a lone % is a systemd specifier: {value}"
    return value.replace("%%", "%")


def test_the_systemd_unit_runs_the_worker_under_memwarden_run() -> None:
    entries = unit()
    env: dict[str, str] = {}
    for line in entries["Service.Environment"]:
        for word in shlex.split(line):
            name, _, value = word.partition("=")
            env[name] = no_specifiers(value)
    config = Config.from_env(memwarden_env(env))
    (exec_start,) = entries["Service.ExecStart"]
    argv = [no_specifiers(w) for w in shlex.split(exec_start.lstrip("@-:+!"))]
    assert Path(argv[0]).name == "memwarden" and argv[1] == "run"
    check_command(argv, env)
    assert entries["Service.MemoryMax"], "MemoryMax= is the quota run reads"
    assert entries["Service.KillMode"] == ["mixed"], "only run gets the unit's SIGTERM"
    (stop,) = entries["Service.TimeoutStopSec"]
    assert parse_duration(stop, "TimeoutStopSec") > config.shutdown_timeout
    assert entries["Service.Restart"] in (["on-failure"], ["always"])


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """systemd's own parser: no unknown key, no bad value (where systemd-analyze exists; it
    is not among what CI installs)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    memwarden = Path(sys.executable).with_name("memwarden")
    text = UNIT.read_text()
    copy = tmp_path / UNIT.name
    # verify looks for the executable: point ExecStart= at this checkout's memwarden.
    copy.write_text(text.replace("/srv/shop/.venv/bin/memwarden", str(memwarden), 1))
    done = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=120
    )
    said = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and not said, said
