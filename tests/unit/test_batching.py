"""The batch as sequences (herl/training/batching.py): lean log-probs equal the full-logits
path, gradient checkpointing gives the same gradients, micro-batches bounded by rows and
padded tokens."""

from __future__ import annotations

import torch

import herl.training.batching as train_mod
from herl.models.paths import resolve_model_path
from herl.training.batching import sequence_logprobs


def _batch():
    from herl.models.tokenizer import load_tokenizer

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


def test_micro_batches_respect_rows_and_padded_tokens():
    from herl.training.batching import micro_batches

    lengths = [n + 4 for n in [10] * 40 + [200] * 5]  # prompt + 4 response tokens, sorted
    rows = list(range(len(lengths)))
    assert [len(c) for c in micro_batches(rows, lengths, 32)] == [32, 13]
    chunks = micro_batches(rows, lengths, 32, max_tokens=500)
    assert sum(len(c) for c in chunks) == 45
    for c in chunks:  # every chunk within both bounds, unless a single row is longer than the budget
        longest = max(lengths[r] for r in c)
        assert len(c) <= 32 and (len(c) * longest <= 500 or len(c) == 1)
    assert [len(c) for c in chunks][-3:] == [2, 2, 1]  # the 204-token rows go two at a time
