"""The README and the docs pages stay true to the code: config reference, tables, the test
command, and every docs page reachable from the README."""

from __future__ import annotations

from schemas.config import reference_markdown
from schemas.tables import TABLES
from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def test_config_reference_is_current():
    page = (DOCS / "configuration.md").read_text()
    assert reference_markdown() in page, "regenerate docs/configuration.md's table with: python -m schemas.config"


def test_every_table_is_documented_with_its_grain():
    page = (DOCS / "sql.md").read_text()
    for t in TABLES.values():
        assert f"| `{t.name}` | {t.grain} |" in page


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    for cmd in ("pip install torch==2.13.0 && pip install -e '.[test,ray]' && python -m pytest -q",
                "python -m pytest -q -m cluster -n 0"):  # the suite, then the cluster group
        assert cmd in README and cmd in ci, cmd


def test_algorithm_page_names_only_real_switches():
    """docs/algorithm.md names config fields as `section.field`: each must exist, and every
    switch of the loss and the hindsight prompt must be described there."""
    import re

    from schemas.config import HerlConfig

    page = (ROOT / "docs" / "algorithm.md").read_text()
    fields = set()

    def walk(model, prefix):
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")
            else:
                fields.add(prefix + name)

    walk(HerlConfig, "")
    named = {m for m in re.findall(r"`([a-z_]+\.[a-z_.]+)[` ]", page) if m.split(".")[0] in HerlConfig.model_fields}
    assert named and named <= fields, named - fields
    for key in ("train.hindsight_weight", "train.gamma", "train.loss_aggregation", "grade.pitfalls",
                "hindsight.template", "hindsight.chat_template", "hindsight.temperature", "train.weight_decay",
                "train.revision_logprob_temperature"):
        assert f"`{key}`" in page or f"`{key} =" in page, key




def test_the_readme_is_a_front_door_to_every_page():
    """README.md stays short (at most 200 lines) and links every page under docs/; every
    relative link in the README and the docs resolves to a file."""
    import re

    assert len(README.splitlines()) <= 200, "README.md is a front door: move detail to a docs/ page"
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert pages and all(f"(docs/{p})" in README or f"(docs/{p}#" in README for p in pages), pages
    for doc in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
