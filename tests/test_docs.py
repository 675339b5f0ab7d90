"""The README stays true to the code: config reference, tables, and the test command."""

from __future__ import annotations

from schemas.config import reference_markdown
from schemas.tables import TABLES
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_config_reference_is_current():
    assert reference_markdown() in README, "regenerate the README table with: python -m schemas.config"


def test_every_table_is_documented_with_its_grain():
    for t in TABLES.values():
        assert f"| `{t.name}` | {t.grain} |" in README


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = "pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q"
    assert cmd in README and cmd in ci
