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
    """One micro-batch's loss (with its graph) and what the metrics need from it."""

    loss: torch.Tensor
    on_policy: float  # contribution of on-policy tokens to the loss
    hindsight: float  # contribution of hindsight tokens
    kl: float  # mean k3 KL over tokens (0 without a reference)
    clipped_tokens: int  # on-policy tokens whose ratio was clipped
    on_tokens: int
    hindsight_tokens: int
    ratio_sum: float


@dataclass
class LossTotals:
    """Running sums of an update's LossParts (and of the truncated IS weights' statistics),
    turned into the train stage's metrics by `metrics`."""

    loss: float = 0.0
    on_policy: float = 0.0
    hindsight: float = 0.0
    kl: float = 0.0
    clipped_tokens: float = 0.0
    on_tokens: float = 0.0
    hindsight_tokens: float = 0.0
    ratio_sum: float = 0.0
    is_ratio_sum: float = 0.0
    is_truncated: float = 0.0
    is_tokens: float = 0.0

    def add(self, parts: LossParts) -> None:
        self.loss += float(parts.loss.detach())
        for name in ("on_policy", "hindsight", "kl", "clipped_tokens", "on_tokens", "hindsight_tokens", "ratio_sum"):
            setattr(self, name, getattr(self, name) + getattr(parts, name))

    def add_is(self, stats: dict[str, float]) -> None:
        """Add truncated_is_weight's sums."""
        for name, value in stats.items():
            setattr(self, name, getattr(self, name) + value)

    def as_list(self) -> list[float]:
        return [float(v) for v in vars(self).values()]

    @classmethod
    def from_list(cls, values: list[float]) -> LossTotals:
        return cls(*values)

    def metrics(self, steps: int) -> dict[str, float]:
        """Per optimizer step (losses, KL) and per token (clip fraction, ratios)."""
        tokens = self.on_tokens + self.hindsight_tokens
        return {
            "loss": self.loss / steps,
            "loss_on_policy": self.on_policy / steps,
            "loss_hindsight": self.hindsight / steps,
            "kl": self.kl / steps,
            "clip_fraction": self.clipped_tokens / max(1, self.on_tokens),
            "mean_ratio": self.ratio_sum / max(1, self.on_tokens),
            "hindsight_token_fraction": self.hindsight_tokens / max(1, tokens),
            "is_mean_ratio": self.is_ratio_sum / max(1, self.is_tokens),
            "is_truncated_fraction": self.is_truncated / max(1, self.is_tokens),
        }


def hindsight_weight(logp: torch.Tensor, old_logp: torch.Tensor, form: str, gamma: float) -> torch.Tensor:
    """The per-token weight w of a hindsight (revision) token, loss = -A * w; (B, T).

    ratio (the reference's code): x = r = pi_theta / pi_old (log-ratio clamped to [-20, 20]);
    prob (LUFFY's policy shaping, the form the paper's text cites): x = p = pi_theta.
    w = x / (x + gamma), no clip; gamma <= 0 means no shaping (w = x), as in the reference.
    The gradient flows through logp only."""
    x = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0)) if form == "ratio" else torch.exp(logp)
    return x / (x + gamma) if gamma > 0 else x


def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """pi_theta / pi_old per token, (B, T); the reference clamps log-ratios to [-20, 20] so
    exp() cannot overflow."""
    return torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))


def on_policy_loss(ratio: torch.Tensor, adv: torch.Tensor, cfg: TrainConfig,
                   is_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate with the dual clip for negative advantages, per token; (B, T).

    ratio, adv (broadcast per token), is_weight: (B, T). Returns the loss and where the
    clip was active (the unclipped term was the smaller loss). `is_weight` (truncated
    importance weights pi_old / pi_engine, no gradient) scales it."""
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)
    clipped = torch.maximum(pg1, pg2)
    dual = torch.minimum(-adv * cfg.dual_clip_c, clipped)
    loss = torch.where(adv < 0, dual, clipped)
    if is_weight is not None:
        loss = loss * is_weight.detach()
    return loss, pg2 > pg1


def hindsight_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """The revision tokens' loss, -A * w (hindsight_weight), per token; (B, T)."""
    return -adv * hindsight_weight(logp, old_logp, cfg.hindsight_weight, cfg.gamma)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, denominator: float | torch.Tensor) -> torch.Tensor:
    """Sum a per-token quantity (B, T) over the masked tokens and divide by `denominator`
    (loss_denominators): one number (summed first, then divided: the token mean's exact
    rounding) or one per sequence, (B,) (each token divided by its sequence's first)."""
    if isinstance(denominator, torch.Tensor):
        return (per_token * mask / denominator.to(per_token.dtype)[:, None]).sum()
    return (per_token * mask).sum() / denominator


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                is_hindsight: torch.Tensor, mask: torch.Tensor, cfg: TrainConfig, denominator: float | torch.Tensor,
                ref_logp: torch.Tensor | None = None, is_weight: torch.Tensor | None = None) -> LossParts:
    """HeRL's mixed-policy loss of a micro-batch: on-policy tokens by on_policy_loss,
    hindsight tokens by hindsight_loss, plus kl_coef x k3 KL, aggregated by `aggregate`.

    logp, old_logp, mask, ref_logp, is_weight: (B, T); advantages: (B,); is_hindsight: (B,)
    bool; denominator as `aggregate` takes it.
    """
    mask = mask.to(logp.dtype)
    adv = advantages[:, None].to(logp.dtype).expand_as(logp)  # (B, T)
    revision = is_hindsight[:, None].expand_as(logp)  # (B, T): hindsight tokens

    ratio = importance_ratio(logp, old_logp)
    on_loss, clip_active = on_policy_loss(ratio, adv, cfg, is_weight)
    revision_loss = hindsight_loss(logp, old_logp, adv, cfg)
    per_token = torch.where(revision, revision_loss, on_loss)
    kl_val = torch.zeros((), dtype=logp.dtype)
    if ref_logp is not None and cfg.kl_coef > 0:
        k3 = k3_kl(logp, ref_logp)
        per_token = per_token + cfg.kl_coef * k3
        kl_val = aggregate(k3, mask, denominator)

    on_mask = mask * (~revision)
    revision_mask = mask * revision
    on_loss, revision_loss, ratio = on_loss.detach(), revision_loss.detach(), ratio.detach()
    return LossParts(
        loss=aggregate(per_token, mask, denominator),
        on_policy=float(aggregate(on_loss * (~revision), mask, denominator)),
        hindsight=float(aggregate(revision_loss * revision, mask, denominator)),
        kl=float(kl_val.detach()),
        clipped_tokens=int((clip_active & (on_mask > 0)).sum()),
        on_tokens=int(on_mask.sum()),
        hindsight_tokens=int(revision_mask.sum()),
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
    dr_grpo                  Dr. GRPO: mean over sequences of token sums / a constant
                             length (norm_length, the answer budget): norm_length * N each
    """
    n = len(mb_lengths)
    if mode == "token_mean":
        return float(sum(mb_lengths)) or 1.0
    if mode == "seq_mean_token_mean":
        return [float(max(1, m) * n) for m in lengths]
    if mode == "dr_grpo":
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
