"""The layout holds: imports go one way, the linter and the type checker are clean, and
docs/architecture.md's module map names every module and the tests of each."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()
PACKAGES = ("herl", "flows", "stages", "schemas")


# the layers, top first: a module may import from its own layer or one below it
LAYERS = ("cli", "flows", "stages", "herl", "schemas")
# herl's sub-packages, top first (herl.commands is the cli layer): each imports only
# from the ones after it, and herl/__init__ and herl/sql (the SQL models) are the floor
HERL_PACKAGES = ("commands", "trainer_service", "training", "runs", "evaluation", "data", "grading", "generation", "cluster",
                 "models", "util", "sql")


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for folder in PACKAGES for p in sorted((ROOT / folder).rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, read from the source with ast: a lazy import inside a
    function and one under TYPE_CHECKING count too."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from herl.x import y` (y a module)
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "herl" and len(parts) > 1 and parts[1] == "commands":
        return "cli"
    return parts[0] if parts[0] in LAYERS else None


def test_imports_go_one_way():
    """cli (herl.commands) -> flows -> stages -> library (herl) -> schemas: no module
    imports from a layer above its own, and no stage imports another stage (what two
    stages share lives in the library)."""
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        mine = _layer(module)
        for target in _imports(path):
            target = target if target in modules else target.rsplit(".", 1)[0]
            theirs = _layer(target)
            if mine is None or theirs is None or target not in modules:
                continue
            upward = LAYERS.index(theirs) < LAYERS.index(mine)
            sideways = (mine == theirs == "stages" and target not in ("stages", "stages.common")
                        and module != "stages" and target.split(".")[1] != module.split(".")[1])
            if upward or sideways:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_herl_subpackages_import_downward_only():
    """Inside herl, each sub-package imports only from the sub-packages below it in
    HERL_PACKAGES (commands -> trainer_service -> training -> runs -> evaluation -> data -> grading -> generation -> cluster -> models
    -> util -> sql); every module of herl lives in one of them."""
    modules = _modules()
    herl = {m: p for m, p in modules.items() if m.startswith("herl.")}
    loose = sorted(m for m in herl if m.split(".")[1] not in HERL_PACKAGES)
    assert not loose, f"modules of herl outside its sub-packages: {loose}"
    wrong = []
    for module, path in herl.items():
        mine = HERL_PACKAGES.index(module.split(".")[1])
        for target in _imports(path):
            parts = target.split(".")
            if parts[0] == "herl" and len(parts) > 1 and parts[1] in HERL_PACKAGES:
                if HERL_PACKAGES.index(parts[1]) < mine:
                    wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles():
    """No two modules of herl, flows, stages and schemas import each other, directly or
    through others (lazy and TYPE_CHECKING imports included): every module can be read
    after the ones it uses."""
    modules = _modules()
    graph = {m: sorted({t if t in modules else t.rsplit(".", 1)[0] for t in _imports(p)} & set(modules) - {m})
             for m, p in modules.items()}
    # a package's __init__ imported by its own modules is not a cycle worth naming: only
    # edges between modules that are not each other's package
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if m.startswith(n + ".") or n.startswith(m + "."):
                continue
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def _tool(name: str) -> list[str]:
    if shutil.which(name) is None and subprocess.run([sys.executable, "-m", name, "--version"],
                                                      capture_output=True).returncode != 0:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return [sys.executable, "-m", name]


def test_ruff_is_clean():
    """The linter (configured in pyproject.toml [tool.ruff]) passes on the whole tree."""
    proc = subprocess.run([*_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_is_clean():
    """The type checker (pyproject.toml [tool.mypy]) passes on herl, flows, stages and schemas."""
    proc = subprocess.run([*_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _module_map() -> str:
    section = ARCHITECTURE.split("## Layout", 1)[1]
    return section.split("\n## ", 1)[0]


def test_the_readme_module_map_matches_the_tree():
    """Every module of the four packages (and every SQL model and template) is in
    docs/architecture.md's Layout map, nothing the map names is missing, and every test file it names exists."""
    table = _module_map()
    named = set(re.findall(r"`((?:herl|flows|stages|schemas)/[\w/]+\.(?:py|sql|j2))`", table))
    tree = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
            if p.suffix in (".py", ".sql", ".j2") and "__pycache__" not in p.parts}
    assert sorted(tree - named) == [], "modules missing from docs/architecture.md's Layout map"
    assert sorted(named - tree) == [], "docs/architecture.md's Layout map names files that do not exist"
    tests = set(re.findall(r"`(tests/(?:unit|system)/test_\w+\.py)`", table))
    assert tests and all((ROOT / t).is_file() for t in tests), sorted(t for t in tests if not (ROOT / t).is_file())
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")}
    assert sorted(on_disk - tests) == [], "test files the map does not name"
