"""One engine for the whole run (herl/generation/engines.py shared_engine): another snapshot of the
same model is loaded into the open engine, and what it generates then equals a fresh
engine's on that snapshot; another model gets its own engine. The vLLM side of the same
contract is in tests/system/test_vllm.py."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from herl.generation.engines import (
    GenRequest,
    SamplingParams,
    load_engine,
    release_engines,
    shared_engine,
)
from herl.models.paths import resolve_model_path
from tests.helpers import greedy, perturbed_copy, same


def test_a_new_snapshot_is_loaded_into_the_open_engine(tmp_path):
    base = resolve_model_path("builtin:tiny")
    a = shutil.copytree(base, tmp_path / "policy-0")
    b = perturbed_copy(base, tmp_path / "policy-1", seed=1)
    try:
        engine = shared_engine("transformers", a)
        on_a = greedy(engine)
        assert engine.sync_seconds == 0.0
        assert shared_engine("transformers", b) is engine  # the same engine, new weights
        assert engine.sync_seconds > 0
        fresh_b = load_engine("transformers", b)
        assert same(greedy(engine), greedy(fresh_b)) and not same(on_a, greedy(fresh_b))
        assert shared_engine("transformers", b) is engine and engine.sync_seconds == 0.0  # nothing to load

        # a snapshot folder replaced on disk (a redone train stage): its new weights are loaded
        shutil.rmtree(b)
        perturbed_copy(base, b, seed=2)
        assert shared_engine("transformers", b) is engine and engine.sync_seconds > 0
        assert same(greedy(engine), greedy(load_engine("transformers", b)))

        # another model (other shapes) gets an engine of its own
        from herl.models.tiny import build_tiny_model

        other = build_tiny_model(tmp_path / "other", hidden=64, layers=1, heads=2, intermediate=128)
        assert shared_engine("transformers", other) is not engine
    finally:
        release_engines()


def test_rest_engines_keeps_sleeps_or_closes(tmp_path):
    from herl.generation import engines

    a = resolve_model_path("builtin:tiny")
    try:
        engine = shared_engine("transformers", a)
        engines.rest_engines("keep")
        assert engine.model is not None and engines._SHARED
        engines.rest_engines("sleep")  # memory freed; the next generate loads the weights again
        assert engine.model is None
        assert same(greedy(engine), greedy(load_engine("transformers", a)))
        engines.rest_engines("auto", free_bytes_needed=1 << 60)  # more than any machine has: closed
        assert not engines._SHARED
        engine = shared_engine("transformers", a)
        engines.rest_engines("restart")
        assert not engines._SHARED
    finally:
        release_engines()


@pytest.mark.parametrize("mode", ["keep", "sleep", "restart"])
def test_a_run_generates_from_each_new_snapshot(tmp_path, mode):
    """Two iterations in one process with the engine kept, asleep or restarted between
    them: iteration 1's rollouts are exactly what a fresh engine on snapshot 1 samples
    (the engine never generates from stale weights)."""
    from herl.runs.rundir import open_run
    from schemas.config import load_config
    from schemas.tables import read_table
    from stages import run_iteration
    from tests.helpers import small_overrides

    cfg = load_config(None, small_overrides(tmp_path, run_id=mode, **{"vllm.between_iterations": mode}))
    run = open_run(cfg)
    try:
        run_iteration(run, 0)
        run_iteration(run, 1)
    finally:
        release_engines()
    # iteration 1's requests again, on a fresh engine loaded from snapshot 1
    rows = read_table("rollouts", run.table(1, "rollouts")).to_pylist()
    requests, seen = [], set()
    for r in rows:
        if r["prompt_id"] not in seen:
            seen.add(r["prompt_id"])
            requests.append(GenRequest(r["prompt_id"], r["prompt_token_ids"], r["seed"], cfg.rollout.n))
    fresh = load_engine("transformers", run.snapshot(1), batch_size=cfg.rollout.batch_size)
    params = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k, cfg.rollout.max_tokens)
    again = [c.token_ids for out in fresh.generate(requests, params) for c in out]
    assert [r["response_token_ids"] for r in rows] == again
    m = {r["name"]: r["value"] for r in read_table("metrics", run.table(1, "metrics", "rollout")).to_pylist()}
    assert (m["engine_weight_sync_seconds"] > 0) == (mode != "restart")


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5), (0.0, 0)])
def test_the_transformers_engine_keeps_one_step_of_logits_and_the_same_logprobs(temperature, top_k):
    """Log-probs taken step by step (one step's logits at a time) equal those from every
    step's logits kept over the whole vocabulary (generate's output_logits), token for
    token, with the same samples: sampling, a top-k sampler, greedy."""
    import torch

    from herl.generation.engines import (
        GenRequest,
        SamplingParams,
        TransformersEngine,
        derive_seed,
        sampling_temperature,
    )

    engine = TransformersEngine(resolve_model_path("builtin:tiny"), batch_size=8)
    reqs = [GenRequest(str(i), [5, 6, 7 + i, 9][: 2 + i], 100 + i, 1) for i in range(3)]
    params = SamplingParams(temperature, 1.0, top_k, 12)
    got = engine._generate_batch(reqs, params)

    # the reference: every step's logits kept, then log_softmax(logits / T) gathered
    pad, width = engine.tokenizer.pad_token_id, max(len(r.prompt_token_ids) for r in reqs)
    ids = torch.full((len(reqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(reqs), width), dtype=torch.long)
    for b, r in enumerate(reqs):
        ids[b, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
        attn[b, width - len(r.prompt_token_ids):] = 1
    kw = dict(max_new_tokens=12, do_sample=temperature > 0, pad_token_id=pad, eos_token_id=sorted(engine.eos_ids),
              return_dict_in_generate=True, output_logits=True)
    if temperature > 0:
        kw.update(temperature=temperature, top_p=1.0, top_k=top_k or None)
    torch.manual_seed(derive_seed(*(r.seed for r in reqs), len(reqs)))
    with torch.no_grad():
        out = engine.model.generate(input_ids=ids, attention_mask=attn, **kw)
    new = out.sequences[:, width:]
    logits = torch.stack(out.logits, dim=1).float() / sampling_temperature(temperature)
    want = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
    for b, comp in enumerate(got):
        assert comp.token_ids == new[b, : len(comp.token_ids)].tolist()
        assert torch.allclose(torch.tensor(comp.logprobs), want[b, : len(comp.token_ids)], atol=1e-6, rtol=0)


def test_auto_never_picks_a_half_made_vllm_environment(tmp_path, monkeypatch):
    """An interrupted `herl install-vllm` leaves a venv with a python and no vLLM: `auto`
    must not pick it (it did, and the run died with ten tracebacks); only the ready file
    the install writes last makes it whole. The environment lives under HERL_HOME."""
    import importlib.util

    from herl.generation import engines

    monkeypatch.setenv("HERL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HERL_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else object())
    venv = tmp_path / "home" / "vllm-venv"
    assert engines.default_vllm_venv() == venv
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)  # what `python -m venv` makes first
    assert engines.resolve_engine_kind("auto") == "transformers"
    assert "interrupted" in engines.vllm_venv_problem(venv) and "herl install-vllm" in engines.vllm_venv_problem(venv)
    (venv / engines.VLLM_READY).write_text("{}")
    assert engines.resolve_engine_kind("auto") == "vllm"
    assert engines.find_vllm_python() == str(venv / "bin" / "python")
    # on a CPU, vLLM only where it paid off: models of 100M parameters or more
    import json

    import torch

    def folder(name: str, params: int) -> Path:
        out = tmp_path / name
        out.mkdir()
        header = json.dumps({"w": {"dtype": "F32", "shape": [params], "data_offsets": [0, 0]}}).encode()
        (out / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
        return out

    if not torch.cuda.is_available():
        assert engines.resolve_engine_kind("auto", path=folder("small", 460_544)) == "transformers"
        assert engines.resolve_engine_kind("auto", path=folder("large", 134_515_008)) == "vllm"
