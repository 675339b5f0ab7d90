"""Training at users' sizes, the parts a CPU can check: float32 master weights under a
bfloat16 model dtype, mixed precision, gradient checkpointing, and log-probs computed
without (B, L, V) logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import herl.batching as train_mod
from herl.rundir import open_run
from herl.tiny import resolve_model_path
from schemas.config import load_config
from stages import advantages, grade, hindsight, rollout, train
from herl.batching import sequence_logprobs
from tests.helpers import small_overrides


def _train_once(tmp_path, **extra):
    cfg = load_config(None, small_overrides(tmp_path, iterations=1, **{"train.learning_rate": 1e-6, **extra}))
    run = open_run(cfg)
    for mod in (rollout, grade, hindsight, advantages, train):
        mod.run(run, 0)
    before = load_file(run.snapshot(0) / "model.safetensors")
    after = load_file(run.snapshot(1) / "model.safetensors")
    # against the initial weights in the saved dtype: loading into bfloat16 rounds them first
    changed = sum(int((before[k].to(after[k].dtype) != after[k]).sum()) for k in before)
    total = sum(v.numel() for v in before.values())
    return changed / total, after


def test_a_small_update_survives_a_bfloat16_model_dtype(tmp_path):
    """model.dtype = bfloat16 with lr 1e-6: training keeps float32 master weights, so the
    update reaches the saved weights (stepping bfloat16 weights loses nearly all of it)."""
    frac, after = _train_once(tmp_path / "mixed", **{"model.dtype": "bfloat16", "train.mixed_precision": "bf16"})
    assert frac > 0.5 and all(v.dtype == torch.float32 for v in after.values())
    with pytest.warns(UserWarning, match="pure_bf16"):
        lost, after_bf16 = _train_once(tmp_path / "pure", **{"model.dtype": "bfloat16", "train.pure_bf16": True})
    print(f"changed fraction: float32 master {frac:.4f}, pure bfloat16 {lost:.4f}")
    assert lost < 0.2 * frac, (lost, frac)  # most of the update vanished below bfloat16's precision
    assert all(v.dtype == torch.bfloat16 for v in after_bf16.values())


def _batch():
    from herl.engines import load_tokenizer

    path = resolve_model_path("builtin:tiny")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [list(range(5, 5 + n)) for n in (7, 30, 3)]
    responses = [list(range(40, 40 + n)) for n in (9, 4, 20)]
    return model, prompts, responses, load_tokenizer(path).pad_token_id


def test_lean_logprobs_equal_the_full_logits_path(monkeypatch):
    model, prompts, responses, pad = _batch()
    monkeypatch.setattr(train_mod, "LOGIT_CHUNK", 3)  # several chunks per response
    lean, mask = sequence_logprobs(model, prompts, responses, pad, [0.7, 1.0, 1.3])
    (lean * mask).sum().backward()
    lean_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(train_mod, "_decoder_and_head", lambda m: None)  # the full (B, L, V) path
    full, mask2 = sequence_logprobs(model, prompts, responses, pad, [0.7, 1.0, 1.3])
    (full * mask2).sum().backward()
    assert torch.equal(mask, mask2)
    assert torch.allclose(lean, full, atol=1e-5)
    for a, b in zip(lean_grads, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model, prompts, responses, pad = _batch()
    model.train()
    lp, mask = sequence_logprobs(model, prompts, responses, pad)
    (lp * mask).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.config.use_cache = False
    lp2, _ = sequence_logprobs(model, prompts, responses, pad)
    (lp2 * mask).sum().backward()
    for a, b in zip(plain, (p.grad for p in model.parameters())):
        assert torch.allclose(a, b, atol=1e-6)


def test_snapshots_are_pruned_and_the_run_still_verifies(tmp_path):
    from herl.rundir import SnapshotPrunedError, fingerprint, load_run, snapshot_meta

    cfg = load_config(None, small_overrides(tmp_path, iterations=4, **{
        "train.keep_snapshots": 2, "train.keep_every": 0, "task.num_prompts": 8}))
    run = open_run(cfg)
    ids = {}
    for k in range(4):
        for mod in (rollout, grade, hindsight, advantages, train):
            mod.run(run, k)
        ids[k + 1] = fingerprint(run.snapshot(k + 1))
    snaps = {j: run.snapshot(j) for j in range(1, 5)}
    # policies 1 and 2: tombstones (metadata only); 3: kept, without optimizer state; 4: whole
    for j in (1, 2):
        assert snapshot_meta(snaps[j])["pruned"] and sorted(p.name for p in snaps[j].iterdir()) == ["herl_snapshot.json"]
    assert (snaps[3] / "model.safetensors").exists() and not (snaps[3] / "optimizer.pt").exists()
    assert (snaps[4] / "optimizer.pt").exists()
    assert {j: fingerprint(snaps[j]) for j in snaps} == ids  # ids survive pruning: manifests still verify
    # a resume finds every stage current
    again = load_run(run.path)
    assert all(mod.run(again, k)["skipped"] for k in range(4) for mod in (rollout, grade, hindsight, advantages, train))
    # a stage that must be redone from a pruned snapshot says so instead of training something else
    def fail(k):  # as a killed attempt leaves it
        m = again.read_manifest(k, "train")
        again.manifest_path(k, "train").write_text(json.dumps({**m, "status": "failed"}))

    fail(1)
    with pytest.raises(SnapshotPrunedError, match="policy-1.*keep_snapshots"):
        train.run(again, 1)
    fail(3)  # policy-3 kept its weights (one of the newest two) but not its AdamW state
    with pytest.raises(SnapshotPrunedError, match="optimizer"):
        train.run(again, 3)
    # nothing was deleted by the refusals
    assert (snaps[3] / "model.safetensors").exists() and (snaps[4] / "optimizer.pt").exists()


def test_the_train_stage_with_gradient_checkpointing(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the current transformers API, not the deprecated one
        frac, _ = _train_once(tmp_path, **{"train.gradient_checkpointing": True, "train.learning_rate": 1e-4})
    assert frac > 0.5
