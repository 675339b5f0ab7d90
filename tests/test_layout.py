"""The layout holds: imports go one way, the linter and the type checker are clean, and
the README's module map names every module and the tests of each."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()
PACKAGES = ("herl", "flows", "stages", "schemas")


def test_imports_go_one_way():
    """cli -> flows -> stages -> library (herl) -> schemas: no module imports from a layer
    above its own, and no stage imports another stage (what two stages share lives in the
    library). Read from the source with ast, so a lazy import inside a function counts too."""
    import ast

    order = {"cli": 0, "flows": 1, "stages": 2, "herl": 3, "schemas": 4}

    def layer(module: str) -> str | None:
        if module.split(".")[:2] in (["herl", "cli"], ["herl", "supervise"]):
            return "cli"
        top = module.split(".")[0]
        return top if top in order else None

    wrong = []
    for folder in ("herl", "flows", "stages", "schemas"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            mine = layer(module)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    targets = [node.module]
                else:
                    continue
                for target in targets:
                    theirs = layer(target)
                    if theirs is None:
                        continue
                    upward = order[theirs] < order[mine]
                    sideways = (mine == theirs == "stages" and target not in ("stages", "stages.common")
                                and module != "stages" and target.split(".")[1] != module.split(".")[1])
                    if upward or sideways:
                        wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


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
    section = README.split("## Layout", 1)[1]
    return section.split("\n## ", 1)[0]


def test_the_readme_module_map_matches_the_tree():
    """Every module of the four packages (and every SQL model and template) is in the README's
    Layout map, nothing the map names is missing, and every test file it names exists."""
    table = _module_map()
    named = set(re.findall(r"`((?:herl|flows|stages|schemas)/[\w/]+\.(?:py|sql|j2))`", table))
    tree = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
            if p.suffix in (".py", ".sql", ".j2") and "__pycache__" not in p.parts}
    assert sorted(tree - named) == [], "modules missing from the README's Layout map"
    assert sorted(named - tree) == [], "the README's Layout map names files that do not exist"
    tests = set(re.findall(r"`(tests/test_\w+\.py)`", table))
    assert tests and all((ROOT / t).is_file() for t in tests), sorted(t for t in tests if not (ROOT / t).is_file())
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")}
    assert sorted(on_disk - tests) == [], "test files the map does not name"
