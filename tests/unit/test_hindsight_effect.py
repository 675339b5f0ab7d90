"""benchmarks/hindsight_effect.py on any model folder: arms are hindsight settings, the
table has paired differences to the control with standard errors, truncation and echo."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq

from herl.models.paths import resolve_model_path
from tests.helpers import ROOT


def test_hindsight_effect_on_a_model_folder(tmp_path):
    model = resolve_model_path("builtin:tiny")  # a folder, as a user's own model would be
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hindsight_effect.py"), "--model", str(model),
                           "--engine", "transformers", "--n", "3", "--drafts", "2", "--max-tokens", "12",
                           "--arms", "herl,goals_details,herl_no_draft", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "results.md").read_text()
    assert "| arm | mean reward | vs control (paired, ± s.e.) |" in text and "| truncated | template echo |" in text
    rows = pq.read_table(out / "followups.parquet").to_pylist()
    arms = {r["arm"] for r in rows}
    assert arms == {"herl", "goals_details", "herl_no_draft", "control"}  # the control is always added
    per_arm = {a: [r for r in rows if r["arm"] == a] for a in arms}
    assert len({len(v) for v in per_arm.values()}) == 1  # every failed draft gets one follow-up per arm
    # the goals prompt is the request plus requirements: shorter than herl's, which shows the draft
    mean = lambda a: sum(r["prompt_tokens"] for r in per_arm[a]) / len(per_arm[a])  # noqa: E731
    assert mean("control") < mean("goals_details") < mean("herl")
    assert all(isinstance(r["truncated"], bool) and isinstance(r["echo"], bool) for r in rows)
