"""benchmarks/hindsight_effect.py on any model folder: arms are hindsight settings, the
table has paired differences to the control with standard errors, truncation and echo."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq

from herl.models.paths import resolve_model_path
from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import hindsight_effect  # noqa: E402


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


def test_pooled_pairs_each_failed_draft_across_measurements(tmp_path):
    """--pool: one pair per failed draft over every folder, never across folders (the same
    prompt and draft index in two measurements are two drafts)."""
    import pyarrow as pa

    # folder a: two drafts; folder b: one draft with the same prompt and index as a's first
    rewards = {"a": [("p1", 0, {"control": 0.0, "herl": 0.5, "goals": 1.0}),
                     ("p2", 1, {"control": 0.5, "herl": 0.0, "goals": 0.5})],
               "b": [("p1", 0, {"control": 1.0, "herl": 0.0, "goals": 0.5})]}
    for name, drafts in rewards.items():
        (tmp_path / name).mkdir()
        rows = [{"arm": arm, "prompt_id": pid, "draft_index": i, "reward": r}
                for pid, i, by_arm in drafts for arm, r in by_arm.items()]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / name / "followups.parquet")
    text = hindsight_effect.pooled([tmp_path / "a", tmp_path / "b"])
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in text.splitlines() if line.startswith("| ") and not line.startswith("| arm")}
    # goals - control over the 3 drafts: (1.0, 0.0, -0.5): mean 0.167, s.e. 0.441 (sample sd 0.764 / sqrt 3)
    assert cells["goals"] == ["+0.167 ± 0.441 (n 3)", "+0.500 ± 0.000 (n 3)"]
    assert cells["herl"][1] == "—" and cells["control"][0] == "—"
    assert "3 failed drafts" in text
