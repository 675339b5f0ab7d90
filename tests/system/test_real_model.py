"""SmolLM2-135M-Instruct, a real instruction model (49k vocabulary, chat template with a
system turn, EOS <|im_end|>): one whole iteration on builtin:ifgen, and the engines'
agreement on it. Needs `herl init-model smollm2-135m-instruct` (CI runs it)."""

from __future__ import annotations

import pytest
import torch

from herl.generation.engines import (
    GenRequest,
    SamplingParams,
    find_vllm_python,
    load_engine,
    render_chat,
)
from herl.models.store import named_model_dir
from herl.runs.rundir import open_run
from herl.training.batching import sequence_logprobs
from schemas.config import PRESETS, VLLMConfig, load_config
from schemas.stages import STAGES
from schemas.tables import read_table
from stages import run_iteration

MODEL = named_model_dir("smollm2-135m-instruct")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "config.json").exists(),
                       reason="SmolLM2 not installed: run `herl init-model smollm2-135m-instruct`"),
]


def test_one_iteration_of_the_preset_on_the_real_model(tmp_path):
    assert load_config(PRESETS / "smollm2.toml").model.path == "builtin:smollm2-135m-instruct"
    # the tests' HERL_HOME is a temporary folder: point at the installed copy itself
    cfg = load_config(PRESETS / "smollm2.toml", {
        "runs_dir": str(tmp_path), "run_id": "smol", "iterations": 1, "rollout.engine": "transformers",
        "model.path": str(MODEL), "task.prompts_per_iteration": 4, "rollout.n": 2, "rollout.max_tokens": 32,
        "hindsight.max_tokens": 32})
    run = open_run(cfg)
    assert all(m["status"] == "done" for m in run_iteration(run, 0).values())
    assert all(run.read_manifest(0, s)["status"] == "done" for s in STAGES)
    rows = read_table("rollouts", run.table(0, "rollouts")).to_pylist()
    assert len(rows) == 8
    eos = 2  # <|im_end|>
    for r in rows:
        assert r["prompt_text"].startswith("<|im_start|>system\n")  # the model's own chat template
        assert r["prompt_text"].endswith("<|im_start|>assistant\n")
        assert (r["finish_reason"] == "stop") == (r["response_token_ids"][-1] == eos)
        assert len(r["response_token_ids"]) <= 32 and max(r["response_token_ids"]) < 49152
    batch = read_table("batch", run.table(0, "batch")).to_pylist()
    assert len(batch) == 8 and {r["temperature"] for r in batch if not r["is_hindsight"]} == {1.0}
    m = {r["name"]: r["value"] for r in read_table("metrics", run.table(0, "metrics", "train")).to_pylist()}
    assert m["optimizer_steps"] == 2 and m["grad_norm"] > 0
    assert (run.snapshot(1) / "model.safetensors").stat().st_size > 500e6


@pytest.mark.skipif(find_vllm_python() is None, reason="no vLLM environment (herl install-vllm --cpu)")
def test_engines_agree_on_the_real_model():
    """Greedy: the same tokens from both engines; log-probs of each engine match the trainer's."""
    tf = load_engine("transformers", MODEL)
    vl = load_engine("vllm", MODEL, vllm_cfg=VLLMConfig(enforce_eager=True, cpu_kvcache_gib=1, max_model_len=1024))
    prompts = [render_chat(tf.tokenizer, [{"role": "user", "content": q}])[1]
               for q in ["What is the capital of France?", "Write one sentence about rain."]]
    reqs = [GenRequest(f"q{i}", ids, i, 1) for i, ids in enumerate(prompts)]
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    a, b = tf.generate(reqs, greedy), vl.generate(reqs, greedy)
    with torch.no_grad():
        lp, mask = sequence_logprobs(tf.model, prompts, [o[0].token_ids for o in a], tf.tokenizer.pad_token_id)
    for i, (x, y) in enumerate(zip(a, b)):
        n = len(x[0].token_ids)
        assert x[0].token_ids[:8] == y[0].token_ids[:8]  # float32 on both; later tokens may tie-break apart
        assert torch.allclose(lp[i, :n], torch.tensor(x[0].logprobs), atol=1e-3)
        k = next((j for j, (s, t) in enumerate(zip(x[0].token_ids, y[0].token_ids)) if s != t), n)
        assert max(abs(p - q) for p, q in zip(x[0].logprobs[:k], y[0].logprobs[:k])) < 0.05
