"""The layers hold: every import in src/memwarden, read from the source (nothing imported),
goes down the layers — cli → analysis, integrations, supervisor → the core (issue 16).

The core is every module directly in ``memwarden/`` plus ``gauges/`` and ``restart/``; it
imports nothing above it. ``click`` is imported in ``cli/`` only. Exceptions are listed
below, each with its reason, and hold only where they are written (a lazy one only inside a
function)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "memwarden"
#: The layers above the core; each imports the core and itself only, but cli (all).
UPPER = ("analysis", "cli", "integrations", "supervisor")
CORE_PACKAGES = ("gauges", "restart")

#: (importer, imported): allowed inside a function only.
LAZY = {
    # A traced job's leak suspects are named by the journal analysis, only once a trace
    # has run (never at import: the warden loads no analysis code).
    ("memwarden.trace", "memwarden.analysis.diagnose"),
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    lazy: bool  # inside a function


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[Import]:
    """Every import in ``path`` (relative ones resolved), and every
    ``importlib.import_module("a literal")``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [base]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            targets = [node.args[0].value]
        for target in targets:
            found.append(Import(name, target, getattr(node, "lineno", 0), lazy))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def layer_of(module: str) -> str:
    """``core``, one of :data:`UPPER`, or ``shim`` (a public path such as
    ``memwarden.celery`` that re-exports ``memwarden.integrations.celery``)."""
    parts = module.split(".")
    if parts[0] != "memwarden" or len(parts) == 1:
        return "core"
    if parts[1] in UPPER:
        return parts[1]
    if (PACKAGE / "integrations" / f"{parts[1]}.py").exists() or (
        PACKAGE / "integrations" / parts[1] / "__init__.py"
    ).exists():
        return "shim"
    return "core"


def is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def problem(imp: Import) -> str | None:
    """Why this import breaks the layers, or None."""
    where = f"{imp.importer}:{imp.line} imports {imp.imported}"
    if imp.imported.split(".")[0] == "click" and layer_of(imp.importer) != "cli":
        return f"{where}: click belongs to cli/"
    if not is_under(imp.imported, "memwarden"):
        return None
    source, target = layer_of(imp.importer), layer_of(imp.imported)
    if target in ("core", source) or source == "cli":
        return None
    if source == "shim":
        own = "memwarden.integrations." + imp.importer.split(".")[1]
        return None if is_under(imp.imported, own) else f"{where}: a shim re-exports its own"
    if imp.lazy and (imp.importer, imp.imported) in LAZY:
        return None
    return f"{where}: {source} may import the core and {source} only"


def all_imports() -> list[Import]:
    return [imp for path in sorted(PACKAGE.rglob("*.py")) for imp in imports_of(path)]


def test_every_import_goes_down_the_layers() -> None:
    imports = all_imports()
    assert len(imports) > 300  # the whole tree was read
    problems = [p for p in map(problem, imports) if p]
    assert not problems, "\n".join(problems)


def test_every_listed_exception_is_still_needed() -> None:
    seen = {(imp.importer, imp.imported) for imp in all_imports() if imp.lazy}
    assert not LAZY - seen, f"no longer imported: {sorted(LAZY - seen)}"


@pytest.mark.parametrize(
    ("importer", "imported", "lazy", "broken"),
    [
        ("memwarden.warden", "memwarden.analysis.digest", False, True),
        ("memwarden.gauges.cgroup", "memwarden.cli", True, True),
        ("memwarden.policy", "click", True, True),
        ("memwarden.integrations.rq", "click", False, True),
        ("memwarden.analysis.read", "memwarden.supervisor.jobs", False, True),
        ("memwarden.supervisor.run", "memwarden.cli.options", False, True),
        ("memwarden.trace", "memwarden.analysis.diagnose", False, True),  # lazy only
        ("memwarden.rq", "memwarden.integrations.huey", False, True),
        ("memwarden.trace", "memwarden.analysis.diagnose", True, False),
        ("memwarden.rq", "memwarden.integrations.rq", False, False),
        ("memwarden.cli.report", "memwarden.analysis.report", False, False),
        ("memwarden.cli.check", "click", False, False),
        ("memwarden.integrations.celery.worker", "memwarden.warden", False, False),
        ("memwarden.warden", "memwarden.events", False, False),
    ],
)
def test_the_rule_catches_what_it_should(
    importer: str, imported: str, lazy: bool, broken: bool
) -> None:
    assert (problem(Import(importer, imported, 1, lazy)) is not None) is broken


#: What an integration may not touch on its warden: it reads ``warden.state`` and calls the
#: warden's methods (memwarden.hooks); the policy and the counters are the warden's own.
WARDEN_PRIVATE = {"policy", "counts", "last_sample", "limits", "overrun", "hooks", "last_culprit"}


def warden_misuse(source: str) -> list[str]:
    """Each write to an attribute of a warden, and each read of its private parts."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            while isinstance(target, ast.Subscript):
                target = target.value
            if isinstance(target, ast.Attribute) and "warden" in ast.unparse(target.value):
                found.append(f"line {node.lineno}: writes {ast.unparse(target)}")
        if (
            isinstance(node, ast.Attribute)
            and node.attr in WARDEN_PRIVATE
            and ast.unparse(node.value).split(".")[-1] in {"warden", "_warden"}
        ):
            found.append(f"line {node.lineno}: reads {ast.unparse(node)}")
    return found


def test_no_integration_writes_warden_state() -> None:
    problems = {
        str(path.relative_to(SRC)): found
        for path in sorted((PACKAGE / "integrations").rglob("*.py"))
        if (found := warden_misuse(path.read_text()))
    }
    assert problems == {}


@pytest.mark.parametrize(
    "source, caught",
    [
        ("self.warden.policy.restarting = True", True),
        ('self.warden.counts["jobs"] += 1', True),
        ("self.warden.hooks = hooks", True),
        ("x = warden.limits.soft", True),
        ("x = self.warden.state.limits.soft", False),
        ("self.warden.attach(hooks)", False),
        ("self.warden = Warden()", False),
    ],
)
def test_the_warden_rule_catches_what_it_should(source: str, caught: bool) -> None:
    assert bool(warden_misuse(source)) is caught
