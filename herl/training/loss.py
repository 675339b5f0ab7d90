"""HeRL's losses as pure functions of tensors (docs/algorithm.md step 9).

No model, optimizer or table here: the trainer (herl/training/trainer.py) computes log-probs and
calls these per micro-batch. Shapes: B sequences, T response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from schemas.config import TrainConfig


@dataclass
class LossParts:
    loss: torch.Tensor
    on_policy: float  # contribution of on-policy tokens to the loss
    hindsight: float  # contribution of hindsight tokens
    kl: float  # mean k3 KL over tokens (0 without a reference)
    clipped_tokens: int  # on-policy tokens whose ratio was clipped
    on_tokens: int
    hindsight_tokens: int
    ratio_sum: float


def hindsight_weight(logp: torch.Tensor, old_logp: torch.Tensor, form: str, gamma: float) -> torch.Tensor:
    """The per-token weight w of a hindsight (revision) token, loss = -A * w; (B, T).

    ratio (the reference's code): x = r = pi_theta / pi_old (log-ratio clamped to [-20, 20]);
    prob (LUFFY's policy shaping, the form the paper's text cites): x = p = pi_theta.
    w = x / (x + gamma), no clip; gamma <= 0 means no shaping (w = x), as in the reference.
    The gradient flows through logp only."""
    x = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0)) if form == "ratio" else torch.exp(logp)
    return x / (x + gamma) if gamma > 0 else x


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                is_hindsight: torch.Tensor, mask: torch.Tensor, cfg: TrainConfig, denominator: float | torch.Tensor,
                ref_logp: torch.Tensor | None = None, is_weight: torch.Tensor | None = None) -> LossParts:
    """HeRL's mixed-policy loss, summed over tokens and divided by `denominator`.

    logp, old_logp, mask, ref_logp, is_weight: (B, T); advantages: (B,); is_hindsight: (B,)
    bool. `denominator` is a number (token_mean: the mini-batch's response-token count, so
    summing the returned losses over its micro-batches gives the token mean) or one per
    sequence, (B,) (see loss_denominators). `is_weight` (truncated importance weights
    pi_old / pi_engine, no gradient) scales the on-policy tokens' loss.
    """
    mask = mask.to(logp.dtype)
    if isinstance(denominator, torch.Tensor):  # one per sequence: (B, 1), applied per token
        per_seq = denominator.to(logp.dtype)[:, None]
        total = lambda x: (x * mask / per_seq).sum()  # noqa: E731
    else:  # one number: sum first, then divide (the token mean's exact rounding)
        total = lambda x: (x * mask).sum() / denominator  # noqa: E731
    adv = advantages[:, None].to(logp.dtype).expand_as(logp)  # (B, T)
    off = is_hindsight[:, None].expand_as(logp)  # (B, T)

    # the reference clamps log-ratios to [-20, 20] so exp() cannot overflow
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)
    clipped = torch.maximum(pg1, pg2)
    dual = torch.minimum(-adv * cfg.dual_clip_c, clipped)
    on_loss = torch.where(adv < 0, dual, clipped)
    if is_weight is not None:
        on_loss = on_loss * is_weight.detach()

    off_loss = -adv * hindsight_weight(logp, old_logp, cfg.hindsight_weight, cfg.gamma)

    per_token = torch.where(off, off_loss, on_loss)
    kl_val = torch.zeros((), dtype=logp.dtype)
    if ref_logp is not None and cfg.kl_coef > 0:
        k3 = k3_kl(logp, ref_logp)
        per_token = per_token + cfg.kl_coef * k3
        kl_val = total(k3)

    loss = total(per_token)
    on_mask = mask * (~off)
    off_mask = mask * off
    on_loss, off_loss, ratio = on_loss.detach(), off_loss.detach(), ratio.detach()
    return LossParts(
        loss=loss,
        on_policy=float(total(on_loss * (~off))),
        hindsight=float(total(off_loss * off)),
        kl=float(kl_val.detach()),
        clipped_tokens=int(((pg2 > pg1) & (on_mask > 0)).sum()),
        on_tokens=int(on_mask.sum()),
        hindsight_tokens=int(off_mask.sum()),
        ratio_sum=float((ratio * on_mask).sum()),
    )


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(pi_theta || pi_ref) per token, (B, T), as verl's `low_var_kl`
    computes it: the log-ratio clamped to [-20, 20] (exp cannot overflow) and k3 to at
    most 10 (one wild token cannot dominate the penalty). Unbiased and non-negative."""
    delta = torch.clamp(ref_logp - logp, -20.0, 20.0)
    return torch.clamp(torch.exp(delta) - delta - 1, min=-10.0, max=10.0)


def loss_denominators(lengths: list[int], mb_lengths: list[int], mode: str, norm_length: int) -> float | list[float]:
    """What the token-loss sums of a micro-batch's responses (token counts `lengths`) are
    divided by, in a mini-batch of responses with token counts `mb_lengths`; the parts of
    all its micro-batches then add up to:

    token_mean               sum of token losses / tokens in the mini-batch (one number)
    seq_mean_token_mean      mean over sequences of each one's token mean: n_i * N each
    seq_mean_token_sum_norm  Dr. GRPO: mean over sequences of token sums / a constant
                             length (norm_length, the answer budget): norm_length * N each
    """
    n = len(mb_lengths)
    if mode == "token_mean":
        return float(sum(mb_lengths)) or 1.0
    if mode == "seq_mean_token_mean":
        return [float(max(1, m) * n) for m in lengths]
    if mode == "seq_mean_token_sum_norm":
        return [float(norm_length * n)] * len(lengths)
    raise ValueError(f"unknown train.loss_aggregation {mode!r}")


def truncated_is_weight(old_lp: torch.Tensor, engine_lp: torch.Tensor, has_engine: torch.Tensor,
                        mask: torch.Tensor, cap: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Token weights min(exp(old - engine), cap) where the engine's log-probs exist, else 1.

    old_lp, engine_lp, mask: (B, T); has_engine: (B,) bool. Returns weights (B, T) and sums
    for the metrics (ratio sum, truncated count, tokens)."""
    ratio = torch.exp(old_lp - engine_lp)
    use = mask & has_engine[:, None]
    weight = torch.where(use, torch.clamp(ratio, max=cap), torch.ones_like(ratio))
    return weight, {"is_ratio_sum": float((ratio * use).sum()), "is_truncated": int(((ratio > cap) & use).sum()),
                    "is_tokens": int(use.sum())}
