"""builtin:ifgen: generated instruction-following prompts with stated, checked constraints,
disjoint from IFEval (which stays a held-out evaluation)."""

from __future__ import annotations

import json
import re

import pytest

from herl.data.ifgen import KINDS, base_requests, builtin_ifgen
from herl.data.importers import load_prompts
from herl.data.pool import evaluation_prompts, load_pool
from herl.grading.rubric import CHECKS, check_params
from schemas.config import load_config
from tests.helpers import BENCHMARKS

IFEVAL = BENCHMARKS / "ifeval_input_data.jsonl"


def test_pool_is_seeded_varied_and_every_item_is_a_stated_registered_check():
    pool = builtin_ifgen(400, seed=0)
    assert pool == builtin_ifgen(400, seed=0) and pool != builtin_ifgen(400, seed=1)
    assert load_pool("builtin:ifgen", 400, 0) == pool
    assert len({p["prompt_id"] for p in pool}) == 400
    assert len({p["messages"][0]["content"] for p in pool}) > 390
    sizes = [len(p["rubric"]) for p in pool]
    assert set(sizes) == {1, 2, 3}
    used = {it["kind"] for p in pool for it in p["rubric"]}
    assert used == set(KINDS) and len(used) >= 20
    for p in pool:
        text = p["messages"][0]["content"]
        for it in p["rubric"]:
            assert it["kind"] in CHECKS
            check_params(it["kind"], json.loads(it["params"]))
            assert it["description"] in text  # the prompt states what the rubric grades
        assert len({it["kind"] for it in p["rubric"]}) == len(p["rubric"])
        assert not {"change_case:english_capital", "change_case:english_lowercase"} <= {it["kind"] for it in p["rubric"]}


@pytest.mark.skipif(not IFEVAL.exists(), reason="IFEval sample not found beside the project")
def test_disjoint_from_ifeval():
    """No IFEval prompt is an ifgen request, and no request shares a 6-word run with one."""
    ifeval = [r["messages"][0]["content"] for r in load_prompts(IFEVAL)]
    assert len(ifeval) == 541

    def grams(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"[a-z']+", text.lower())
        return {tuple(words[i:i + 6]) for i in range(len(words) - 5)}

    ifeval_grams = set().union(*(grams(t) for t in ifeval))
    requests = base_requests()
    assert len(requests) >= 300
    assert not [r for r in requests if grams(r) & ifeval_grams]
    assert not set(requests) & set(ifeval)


@pytest.mark.skipif(not IFEVAL.exists(), reason="IFEval sample not found beside the project")
def test_evaluation_source_and_limit():
    cfg = load_config(None, {"task.source": "builtin:ifgen", "evaluation.every": 2, "evaluation.source": str(IFEVAL),
                             "evaluation.limit": 24})
    chosen = evaluation_prompts(cfg)
    assert len(chosen) == 24 and chosen == evaluation_prompts(cfg)
    assert all(p["prompt_id"].startswith("ifeval-") for p in chosen)
    other = evaluation_prompts(cfg.model_copy(update={"seed": 1}))
    assert {p["prompt_id"] for p in other} != {p["prompt_id"] for p in chosen}
