"""benchmarks/peer_trl.py in a tiny shape (only where TRL is installed: `pip install
'herl[peer]'`): both systems run the same prompts for two iterations and the tables come
out with every part measured."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_peer_trl_runs_both_systems_on_the_same_prompts(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peer_trl

    out = tmp_path / "out"
    tiny = ["model.path=builtin:tiny", "task.prompts_per_iteration=2", "rollout.max_tokens=4",
            "task.num_prompts=16", "task.holdout=4", "rollout.n=2"]
    assert peer_trl.main(["--iterations", "2", "--systems", "trl,herl-transformers", "--out", str(out),
                          *[x for s in tiny for x in ("--set", s)]]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["system"] for r in runs] == ["trl", "herl-transformers"]
    for r in runs:
        assert len(r["iterations"]) == 2 and r["peak_memory_gb"] > 0
        for it in r["iterations"]:
            assert it["wall"] > 0 and it["generation"] > 0 and it["grading"] > 0 and it["training"] > 0
            assert 0.0 <= it["mean_reward"] <= 1.0 and not math.isnan(it["mean_reward"])
    # the same prompt stream: herl's iteration prompts are what TRL's dataset was made of
    cfg = peer_trl.load_cfg(str(ROOT / "schemas" / "presets" / "smollm2_learn.toml"), tiny, 2, "transformers")
    from herl.runs.rundir import load_run
    from schemas.tables import read_table

    run = load_run(out / "work" / "herl-transformers-1" / "run")
    stream = peer_trl.prompt_stream(cfg)
    for k in range(2):
        got = read_table("prompts", run.table(k, "prompts")).column("prompt_id").to_pylist()
        assert sorted(got) == sorted(p["prompt_id"] for p in stream[k])
    report = (out / "results.md").read_text()
    assert "| trl |" in report and "| herl-transformers |" in report and "load" in report
