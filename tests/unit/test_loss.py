"""The mixed-policy loss (herl/training/loss.py) pinned with hand-computed numbers and gradients:
clipping, dual clip, hindsight shaping of each form, masks, KL, IS weights, aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from herl.training.loss import policy_loss
from schemas.config import TrainConfig


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**kw)


def test_loss_on_policy_clip_dual_clip_and_hindsight_shaping():
    ln = math.log
    # row 0: on-policy, A = +1, ratios 2 (clipped to 1.2) and 1
    # row 1: hindsight, A = -1, p = 0.5 then a masked token
    # row 2: on-policy, A = -1, ratio 5: clipped loss 5, dual clip caps it at c = 3
    logp = torch.tensor([[ln(0.5), ln(0.5)], [ln(0.5), ln(0.9)], [ln(0.5), ln(0.5)]])
    old = torch.tensor([[ln(0.25), ln(0.5)], [ln(0.1), ln(0.1)], [ln(0.1), ln(0.5)]])
    adv = torch.tensor([1.0, -1.0, -1.0])
    hind = torch.tensor([False, True, False])
    mask = torch.tensor([[1, 1], [1, 0], [1, 0]], dtype=torch.bool)
    parts = policy_loss(logp, old, adv, hind, mask, _cfg(), denominator=4.0)
    on = -1.2 + -1.0 + 3.0
    off = 1.0 * 5.0 / (5.0 + 1.0)  # default (the reference): r = 0.5 / 0.1 = 5, weight r / (r + 1)
    assert parts.loss.item() == pytest.approx((on + off) / 4)
    assert parts.on_policy == pytest.approx(on / 4)
    assert parts.hindsight == pytest.approx(off / 4)
    assert (parts.on_tokens, parts.hindsight_tokens) == (3, 1)
    assert parts.clipped_tokens == 1  # only row 0's first token (row 2's ratio 5 is unclipped then dual-clipped)

    # gamma and the form change only the hindsight part
    for kw, weight in [({"gamma": 0.1}, 5.0 / 5.1), ({"hindsight_weight": "prob"}, 0.5 / 1.5),
                       ({"hindsight_weight": "prob", "gamma": 0.1}, 0.5 / 0.6),
                       ({"gamma": 0.0}, 5.0), ({"gamma": -1.0, "hindsight_weight": "prob"}, 0.5)]:
        parts_g = policy_loss(logp, old, adv, hind, mask, _cfg(**kw), denominator=4.0)
        assert parts_g.hindsight == pytest.approx(weight / 4), kw
        assert parts_g.on_policy == pytest.approx(parts.on_policy)


def test_log_ratios_are_clamped_to_20():
    """A token whose log-prob moved by 30 nats: the ratio is exp(20), not exp(30), as in the reference."""
    logp, old = torch.tensor([[0.0]]), torch.tensor([[-30.0]])
    hind = policy_loss(logp, old, torch.tensor([-1.0]), torch.tensor([True]), torch.tensor([[True]]),
                       _cfg(gamma=0.0), denominator=1.0)
    assert hind.hindsight == pytest.approx(math.exp(20.0), rel=1e-5)
    on = policy_loss(logp, old, torch.tensor([1.0]), torch.tensor([False]), torch.tensor([[True]]),
                     _cfg(), denominator=1.0)
    assert on.ratio_sum == pytest.approx(math.exp(20.0), rel=1e-5)


@pytest.mark.parametrize("form, gamma, grad", [
    # ratio (default): r = 0.5 / 0.9; d/dlogp [-A r/(r+g)] = -A g r / (r+g)^2
    ("ratio", 1.0, -1.0 * (5 / 9) / (14 / 9) ** 2),
    ("ratio", 0.1, -0.1 * (5 / 9) / (5 / 9 + 0.1) ** 2),
    ("ratio", 0.0, -(5 / 9)),  # no shaping: d/dlogp [-A r] = -A r
    # prob: p = 0.5, no ratio to the old policy; d/dlogp [-A p/(p+g)] = -A g p / (p+g)^2
    ("prob", 1.0, -1.0 * 0.5 / 1.5 ** 2),
    ("prob", 0.1, -0.1 * 0.5 / 0.6 ** 2),
])
def test_hindsight_gradient_of_each_form(form, gamma, grad):
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    parts = policy_loss(logp, torch.tensor([[math.log(0.9)]]), torch.tensor([1.0]), torch.tensor([True]),
                        torch.tensor([[True]]), _cfg(gamma=gamma, hindsight_weight=form), denominator=1.0)
    parts.loss.backward()
    assert logp.grad.item() == pytest.approx(grad)


def test_loss_gradients_of_on_policy_tokens():
    # on-policy token inside the clip range: d/dlogp [-A ratio] = -A ratio
    logp2 = torch.tensor([[math.log(0.5)]], requires_grad=True)
    parts2 = policy_loss(logp2, torch.tensor([[math.log(0.5)]]), torch.tensor([2.0]), torch.tensor([False]),
                         torch.tensor([[True]]), _cfg(), denominator=1.0)
    parts2.loss.backward()
    assert logp2.grad.item() == pytest.approx(-2.0)

    # clipped on-policy token: no gradient
    logp3 = torch.tensor([[math.log(0.5)]], requires_grad=True)
    parts3 = policy_loss(logp3, torch.tensor([[math.log(0.25)]]), torch.tensor([1.0]), torch.tensor([False]),
                         torch.tensor([[True]]), _cfg(), denominator=1.0)
    parts3.loss.backward()
    assert logp3.grad.item() == 0.0


def test_masked_tokens_do_not_count_and_kl_is_added():
    logp = torch.tensor([[-1.0, -50.0]], requires_grad=True)
    old = torch.tensor([[-1.0, 0.0]])
    mask = torch.tensor([[True, False]])
    parts = policy_loss(logp, old, torch.tensor([1.0]), torch.tensor([False]), mask, _cfg(), denominator=1.0)
    assert parts.loss.item() == pytest.approx(-1.0)
    parts.loss.backward()
    assert logp.grad[0, 1].item() == 0.0
    ref = torch.tensor([[-1.5, 0.0]])
    pk = policy_loss(logp.detach(), old, torch.tensor([1.0]), torch.tensor([False]), mask, _cfg(kl_coef=0.1),
                     denominator=1.0, ref_logp=ref)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert pk.kl == pytest.approx(k3)
    assert pk.loss.item() == pytest.approx(-1.0 + 0.1 * k3)


def test_truncated_importance_weights():
    from herl.training.loss import truncated_is_weight

    ln = math.log
    old = torch.tensor([[ln(0.5), ln(0.9)], [ln(0.5), ln(0.5)]])
    engine = torch.tensor([[ln(0.25), ln(0.1)], [ln(0.1), ln(0.1)]])
    mask = torch.tensor([[True, True], [True, False]])
    has = torch.tensor([True, False])  # row 1: no engine log-probs (or a hindsight row)
    w, stats = truncated_is_weight(old, engine, has, mask, cap=2.0)
    # row 0: ratios 2.0 and 9.0 -> 2.0 and the cap 2.0; row 1 untouched
    assert torch.allclose(w, torch.tensor([[2.0, 2.0], [1.0, 1.0]]))
    assert stats == {"is_ratio_sum": pytest.approx(11.0), "is_truncated": 1, "is_tokens": 2}
    # the weight scales the on-policy loss and its gradient
    logp = old.clone().requires_grad_(True)
    parts = policy_loss(logp, old, torch.tensor([1.0, 1.0]), torch.tensor([False, False]), mask, _cfg(),
                        denominator=3.0, is_weight=w)
    assert parts.loss.item() == pytest.approx((-2.0 - 2.0 - 1.0) / 3)


@pytest.mark.parametrize("mode, expected", [
    ("token_mean", (2.0 + 1.0 * 3) / 4),  # all tokens alike: 5 / 4
    ("seq_mean_token_mean", (2.0 / 1 + 3.0 / 3) / 2),  # each sequence's mean, then their mean
    ("dr_grpo", (2.0 / 8 + 3.0 / 8) / 2),  # Dr. GRPO: sums over a constant 8, mean over sequences
])
def test_loss_aggregation_modes(mode, expected):
    """Two on-policy sequences at ratio 1: A = -2 over 1 token, A = -1 over 3 tokens, split
    over two micro-batches as the trainer does; the parts add up to each mode's formula."""
    from herl.training.loss import loss_denominators

    lengths = [1, 3]
    per_chunk = [loss_denominators([n], lengths, mode, norm_length=8) for n in lengths]
    denom = per_chunk[0] if mode == "token_mean" else [d[0] for d in per_chunk]
    total, grads = 0.0, []
    for b, (adv, n) in enumerate([(-2.0, 1), (-1.0, 3)]):
        logp = torch.zeros(1, n, requires_grad=True)
        d = denom if not isinstance(denom, list) else torch.tensor([denom[b]])
        parts = policy_loss(logp, torch.zeros(1, n), torch.tensor([adv]), torch.tensor([False]),
                            torch.ones(1, n, dtype=torch.bool), _cfg(loss_aggregation=mode), denominator=d)
        parts.loss.backward()
        total += parts.loss.item()
        grads.append(logp.grad[0, 0].item())
    assert total == pytest.approx(expected)
    # per-token gradient: -A / (what the token's sequence is divided by)
    per_seq = denom if isinstance(denom, list) else [denom, denom]
    assert grads == pytest.approx([2.0 / per_seq[0], 1.0 / per_seq[1]])


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "dr_grpo"])
def test_aggregation_with_several_sequences_per_micro_batch(mode):
    """Five sequences (lengths 2, 1, 4, 3, 2; one a hindsight row) cut into micro-batches of
    3 and 2 sequences, as the trainer cuts them: the summed loss and every token's gradient
    equal the mode's formula over the whole mini-batch, written out here token by token."""
    from herl.training.loss import loss_denominators

    torch.manual_seed(0)
    lengths, norm = [2, 1, 4, 3, 2], 6
    adv = [0.5, -1.0, 2.0, -0.25, 1.5]
    hind = [False, False, True, False, False]
    logps = [torch.randn(n) * 0.3 - 1.0 for n in lengths]
    olds = [lp + torch.randn(n) * 0.05 for lp, n in zip(logps, lengths)]
    cfg = _cfg(loss_aggregation=mode)

    def token_loss(i, t, lp):  # one token's loss, by the formulas in docs/algorithm.md step 9
        ratio = torch.exp(lp - olds[i][t])
        if hind[i]:
            return -adv[i] * ratio / (ratio + cfg.gamma)
        a = adv[i]
        clipped = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high))
        return torch.minimum(torch.tensor(-a * cfg.dual_clip_c), clipped) if a < 0 else clipped

    # the expected loss, written out per mode
    flat = [torch.tensor(float(lp[t]), requires_grad=True) for lp in logps for t in range(len(lp))]
    pos = [[sum(lengths[:i]) + t for t in range(n)] for i, n in enumerate(lengths)]
    sums = [sum(token_loss(i, t, flat[pos[i][t]]) for t in range(n)) for i, n in enumerate(lengths)]
    if mode == "token_mean":
        expected = sum(sums) / sum(lengths)
    elif mode == "seq_mean_token_mean":
        expected = sum(s / n for s, n in zip(sums, lengths)) / len(lengths)
    else:
        expected = sum(s / norm for s in sums) / len(lengths)
    expected.backward()

    total, grads = 0.0, [None] * len(lengths)
    for chunk in ([0, 1, 2], [3, 4]):
        width = max(lengths[i] for i in chunk)
        logp = torch.zeros(len(chunk), width)
        old = torch.zeros(len(chunk), width)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for b, i in enumerate(chunk):
            logp[b, : lengths[i]], old[b, : lengths[i]], mask[b, : lengths[i]] = logps[i], olds[i], True
        logp.requires_grad_(True)
        denom = loss_denominators([lengths[i] for i in chunk], lengths, mode, norm_length=norm)
        parts = policy_loss(logp, old, torch.tensor([adv[i] for i in chunk]), torch.tensor([hind[i] for i in chunk]),
                            mask, cfg, torch.tensor(denom) if isinstance(denom, list) else denom)
        assert parts.loss.dim() == 0
        parts.loss.backward()
        total += parts.loss.item()
        for b, i in enumerate(chunk):
            grads[i] = logp.grad[b, : lengths[i]]
    assert total == pytest.approx(expected.item(), rel=1e-6)
    for i in range(len(lengths)):
        assert grads[i].tolist() == pytest.approx([flat[p].grad.item() for p in pos[i]], rel=1e-5, abs=1e-7)


def test_k3_is_clamped_as_verl_clamps_it():
    """verl's low_var_kl: the log-ratio clamped to [-20, 20], k3 to at most 10."""
    from herl.training.loss import k3_kl

    logp = torch.tensor([[0.0, 0.0, 0.0, -1.0]])
    ref = torch.tensor([[0.5, 30.0, -30.0, -1.0]])
    k3 = k3_kl(logp, ref)
    assert k3[0, 0].item() == pytest.approx(math.exp(0.5) - 0.5 - 1)
    assert k3[0, 1].item() == 10.0  # exp(20) - 21, capped at 10
    assert k3[0, 2].item() == 10.0  # exp(-20) + 19, capped at 10
    assert k3[0, 3].item() == 0.0
    parts = policy_loss(logp, logp, torch.tensor([0.0]), torch.tensor([False]), torch.ones(1, 4, dtype=torch.bool),
                        _cfg(kl_coef=1.0), denominator=4.0, ref_logp=ref)
    assert parts.kl == pytest.approx(float(k3.sum()) / 4) and math.isfinite(parts.loss.item())
