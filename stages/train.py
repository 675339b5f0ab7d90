"""Train stage: one policy update on the iteration's batch; saves the next snapshot.

docs/algorithm.md step 9. Old log-probs are recomputed with the snapshot at the start of the
step; the batch is split into `mini_batches` mini-batches of whole groups (one optimizer
step each, gradients accumulated over micro-batches). Per token:
  on-policy (rollouts, duplicates): PPO clip with dual clip for negative advantages;
  hindsight revisions: -A * w, w = r / (r + gamma) with r = pi_theta / pi_old (the
      reference's code; train.hindsight_weight = prob uses p = pi_theta, LUFFY's form);
aggregated as train.loss_aggregation says (default: the token mean over all response
tokens of the mini-batch; see loss_denominators), plus an optional
k3 KL penalty to the initial policy. AdamW state is saved with each snapshot, so the
next iteration continues the same optimizer.

Reads:  iter-k/batch.parquet, snapshot k (and snapshot 0 when train.kl_coef > 0)
Writes: snapshots/policy-<k+1>/  (HF layout, safetensors, tokenizer, optimizer.pt,
                                   herl_snapshot.json), atomically
        iter-k/metrics-train.parquet
Alone:  python -m stages.train runs/<run_id> --iteration K
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from herl.engines import _quiet_transformers, load_tokenizer
from herl.rundir import Run, SnapshotPrunedError, seal_snapshot, snapshot_meta
from schemas.config import TrainConfig, stage_config_hash
from schemas.tables import read_table
from stages.common import stage_main, write_metrics

STAGE = "train"


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
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(logp.dtype)[:, None]  # (B, 1)
    mask = mask.to(logp.dtype)
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
        delta = ref_logp - logp
        k3 = torch.exp(delta) - delta - 1  # unbiased, non-negative KL estimator
        per_token = per_token + cfg.kl_coef * k3
        kl_val = (k3 * mask).sum() / denominator

    loss = (per_token * mask).sum() / denominator
    on_mask = mask * (~off)
    off_mask = mask * off
    on_loss, off_loss, ratio = on_loss.detach(), off_loss.detach(), ratio.detach()
    return LossParts(
        loss=loss,
        on_policy=float((on_loss * on_mask).sum() / denominator),
        hindsight=float((off_loss * off_mask).sum() / denominator),
        kl=float(kl_val),
        clipped_tokens=int(((pg2 > pg1) & (on_mask > 0)).sum()),
        on_tokens=int(on_mask.sum()),
        hindsight_tokens=int(off_mask.sum()),
        ratio_sum=float((ratio * on_mask).sum()),
    )


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


def sequence_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      temperatures: list[float] | None = None):
    """Per-token log-probs of each response given its prompt, under logits / T with T the
    temperature each response was sampled at (as verl and TRL do; None: T = 1), so ratios
    refer to the policy that sampled.

    Returns logp (B, R) and mask (B, R), R the longest response; right-padded.
    """
    device = next(model.parameters()).device
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width, rmax = max(lengths), max(1, max(len(r) for r in responses))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)  # (B, L)
    attn = torch.zeros_like(input_ids)
    index = torch.zeros((len(prompts), rmax), dtype=torch.long, device=device)  # (B, R) logit positions
    targets = torch.full((len(prompts), rmax), pad_id, dtype=torch.long, device=device)  # (B, R)
    mask = torch.zeros((len(prompts), rmax), dtype=torch.bool, device=device)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor(p + r, dtype=torch.long, device=device)
        input_ids[b, : len(seq)] = seq
        attn[b, : len(seq)] = 1
        if r:
            # the logits at position i predict token i + 1: response token j sits at len(p) + j
            index[b, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r), device=device)
            targets[b, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
            mask[b, : len(r)] = True
    temp = torch.tensor(temperatures or [1.0] * len(prompts), dtype=torch.float32, device=device)[:, None, None]
    parts = _decoder_and_head(model)
    if parts is None:  # a model whose head we cannot apply ourselves: full logits
        logits = model(input_ids=input_ids, attention_mask=attn).logits  # (B, L, V)
        picked = logits.gather(1, index[..., None].expand(-1, -1, logits.size(-1))).float()  # (B, R, V)
        logp = torch.log_softmax(picked / temp, dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # (B, R)
        return logp * mask, mask
    # memory-lean: the head only at response positions, LOGIT_CHUNK of them at a time, so
    # no (B, L, V) float32 logits exist (several GB per micro-batch at a 150k vocabulary)
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attn).last_hidden_state  # (B, L, H)
    hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.size(-1)))  # (B, R, H)
    pieces = []
    for start in range(0, rmax, LOGIT_CHUNK):
        logits = head(hidden[:, start:start + LOGIT_CHUNK]).float() / temp  # (B, c, V)
        pieces.append(torch.log_softmax(logits, dim=-1).gather(
            -1, targets[:, start:start + LOGIT_CHUNK, None]).squeeze(-1))  # (B, c)
    logp = torch.cat(pieces, dim=1)  # (B, R)
    return logp * mask, mask


LOGIT_CHUNK = 64  # response positions whose logits exist at once in sequence_logprobs


def _decoder_and_head(model):
    """(decoder returning last_hidden_state, lm_head) of a causal LM whose logits are just
    head(hidden); None for models that scale or cap their logits, or hide their parts."""
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def _temperatures(chunk: list[dict]) -> list[float]:
    # rows without a temperature (hand-built batches) count as sampled at T = 1
    return [r.get("temperature") or 1.0 for r in chunk]


def _length(row: dict) -> int:
    return len(row["prompt_token_ids"]) + len(row["response_token_ids"])


def micro_batches(rows: list[dict], size: int, max_tokens: int | None = None) -> list[list[dict]]:
    """Split length-sorted rows into micro-batches of at most `size` rows and, when
    `max_tokens` is set, at most `max_tokens` padded tokens (rows x longest row).

    A long hindsight prompt padded together with 31 short rollouts costs as much as 32
    long sequences; the token bound gives long rows smaller micro-batches. The loss is a
    token sum over a fixed denominator, so the split changes speed and memory only."""
    out: list[list[dict]] = []
    chunk: list[dict] = []
    longest = 0
    for r in rows:
        n = _length(r)
        if chunk and (len(chunk) >= size or (max_tokens and (len(chunk) + 1) * max(longest, n) > max_tokens)):
            out.append(chunk)
            chunk, longest = [], 0
        chunk.append(r)
        longest = max(longest, n)
    if chunk:
        out.append(chunk)
    return out


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


def _chunk_is_weight(chunk: list[dict], old_lp: torch.Tensor, mask: torch.Tensor,
                     cap: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated IS weights (B, T) of a micro-batch from its rows' stored engine log-probs.

    Rows without usable engine log-probs (missing, or not one per response token) and
    hindsight rows (policy shaping, no behaviour-policy ratio) get weight 1."""
    engine = [r["engine_logprobs"] for r in chunk]
    usable = [e is not None and None not in e and len(e) == len(r["response_token_ids"]) and not r["is_hindsight"]
              for e, r in zip(engine, chunk)]
    width = old_lp.size(1)
    engine_lp = torch.stack([torch.nn.functional.pad(torch.tensor(e if ok else [], dtype=old_lp.dtype),
                                                     (0, width - (len(e) if ok else 0)))
                             for e, ok in zip(engine, usable)]).to(old_lp.device)  # (B, T)
    return truncated_is_weight(old_lp, engine_lp, torch.tensor(usable, device=old_lp.device), mask, cap)


def train_on_batch(model, optimizer, accelerator, rows: list[dict], cfg: TrainConfig, seed: int, pad_id: int,
                   ref_model=None, norm_length: int | None = None) -> dict[str, float]:
    """One iteration's update: old log-probs, then ppo_epochs x mini_batches optimizer steps.

    norm_length: the constant of loss_aggregation = seq_mean_token_sum_norm (the answer
    budget, rollout.max_tokens); None takes the batch's longest response."""
    micro, budget = cfg.micro_batch_size, cfg.micro_batch_tokens
    norm_length = norm_length or max(len(r["response_token_ids"]) for r in rows)

    # old log-probs from the snapshot as loaded (the behaviour policy of the rollouts)
    model.eval()
    old: list[torch.Tensor] = []
    refs: list[torch.Tensor | None] = []
    # micro-batches of similar lengths: short rollouts and long hindsight sequences would
    # otherwise share a micro-batch padded to the longest one
    rows = sorted(rows, key=_length)
    totals = dict(loss=0.0, on=0.0, off=0.0, kl=0.0, clipped=0, on_tokens=0, off_tokens=0, ratio=0.0, grad_norm=0.0,
                  is_ratio_sum=0.0, is_truncated=0, is_tokens=0)
    weights: list[torch.Tensor | None] = []
    with torch.no_grad():
        for chunk in micro_batches(rows, micro, budget):
            lp, m = sequence_logprobs(model, [r["prompt_token_ids"] for r in chunk],
                                      [r["response_token_ids"] for r in chunk], pad_id, _temperatures(chunk))
            old.extend(lp[i, : int(m[i].sum())] for i in range(len(chunk)))
            if cfg.is_correction == "truncated":  # fixed per token for the whole update: computed once
                w, is_stats = _chunk_is_weight(chunk, lp, m, cfg.is_cap)
                weights.extend(w[i, : int(m[i].sum())] for i in range(len(chunk)))
                for key, value in is_stats.items():
                    totals[key] += value
            else:
                weights.extend([None] * len(chunk))
            if ref_model is not None:
                rl, _ = sequence_logprobs(ref_model, [r["prompt_token_ids"] for r in chunk],
                                          [r["response_token_ids"] for r in chunk], pad_id, _temperatures(chunk))
                refs.extend(rl[i, : int(m[i].sum())] for i in range(len(chunk)))
            else:
                refs.extend([None] * len(chunk))
    for r, o, f, w in zip(rows, old, refs, weights, strict=True):
        r["_old"], r["_ref"], r["_is"] = o, f, w

    model.train()
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    steps = 0
    for epoch in range(cfg.ppo_epochs):
        order = sorted(groups)
        random.Random(f"{seed}:{epoch}").shuffle(order)
        n_mb = min(cfg.mini_batches, len(order))
        for mb_index in range(n_mb):
            mb = sorted((r for pid in order[mb_index::n_mb] for r in groups[pid]), key=_length)
            mb_lengths = [len(r["response_token_ids"]) for r in mb]
            for chunk in micro_batches(mb, micro, budget):
                logp, mask = sequence_logprobs(model, [r["prompt_token_ids"] for r in chunk],
                                               [r["response_token_ids"] for r in chunk], pad_id, _temperatures(chunk))
                width = logp.size(1)
                pad = lambda t: torch.nn.functional.pad(t, (0, width - t.numel()))  # noqa: E731
                old_lp = torch.stack([pad(r["_old"]) for r in chunk]).to(logp.device)
                ref_lp = torch.stack([pad(r["_ref"]) for r in chunk]).to(logp.device) if ref_model is not None else None
                hindsight = torch.tensor([r["is_hindsight"] for r in chunk], device=logp.device)
                is_weight = torch.stack([pad(r["_is"]) for r in chunk]).to(logp.device) \
                    if cfg.is_correction == "truncated" else None
                denom = loss_denominators([len(r["response_token_ids"]) for r in chunk], mb_lengths,
                                          cfg.loss_aggregation, norm_length)
                chunk_denom = torch.tensor(denom, device=logp.device) if isinstance(denom, list) else denom
                parts = policy_loss(
                    logp, old_lp, torch.tensor([r["advantage"] for r in chunk], device=logp.device),
                    hindsight, mask, cfg, chunk_denom, ref_lp, is_weight,
                )
                accelerator.backward(parts.loss)
                totals["loss"] += float(parts.loss.detach())
                totals["on"] += parts.on_policy
                totals["off"] += parts.hindsight
                totals["kl"] += parts.kl
                totals["clipped"] += parts.clipped_tokens
                totals["on_tokens"] += parts.on_tokens
                totals["off_tokens"] += parts.hindsight_tokens
                totals["ratio"] += parts.ratio_sum
            if cfg.max_grad_norm > 0:
                norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            else:
                norm = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in model.parameters() if p.grad is not None))
            totals["grad_norm"] += float(norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    for r in rows:
        for key in ("_old", "_ref", "_is"):
            r.pop(key, None)
    tokens = totals["on_tokens"] + totals["off_tokens"]
    return {
        "loss": totals["loss"] / steps,
        "loss_on_policy": totals["on"] / steps,
        "loss_hindsight": totals["off"] / steps,
        "kl": totals["kl"] / steps,
        "clip_fraction": totals["clipped"] / max(1, totals["on_tokens"]),
        "mean_ratio": totals["ratio"] / max(1, totals["on_tokens"]),
        "grad_norm": totals["grad_norm"] / steps,
        "hindsight_token_fraction": totals["off_tokens"] / max(1, tokens),
        "is_mean_ratio": totals["is_ratio_sum"] / max(1, totals["is_tokens"]),
        "is_truncated_fraction": totals["is_truncated"] / max(1, totals["is_tokens"]),
        "optimizer_steps": steps,
        "tokens": tokens // cfg.ppo_epochs,
        "sequences": len(rows),
    }


def run(run: Run, k: int) -> dict:
    cfg = run.cfg
    inputs = {"batch": run.table(k, "batch"), "snapshot": run.snapshot(k)}
    if cfg.train.kl_coef > 0:
        inputs["reference"] = run.snapshot(0)
    out_dir = run.snapshot(k + 1)

    def body():
        from accelerate import Accelerator
        from transformers import AutoModelForCausalLM

        _quiet_transformers()
        t0 = time.perf_counter()
        seed = int(hashlib.sha256(f"{cfg.seed}:{k}:train".encode()).hexdigest()[:8], 16)
        torch.manual_seed(seed)
        t = cfg.train
        # accelerate keeps one state per process; the stage runs inside the flow process, and
        # two runs (or a resume with another train.mixed_precision) may want different ones
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=t.mixed_precision)
        # master weights and AdamW state in float32 (an lr-1e-6 update is below bfloat16's
        # precision and would be lost); pure bfloat16 only when asked for by name
        dtype = torch.bfloat16 if t.pure_bf16 else torch.float32
        if t.pure_bf16 and t.learning_rate < 1e-4:
            warnings.warn(f"train.pure_bf16 with learning rate {t.learning_rate:g}: most updates are smaller than "
                          "bfloat16's precision and are lost; prefer train.mixed_precision = 'bf16'", stacklevel=1)
        model = AutoModelForCausalLM.from_pretrained(inputs["snapshot"], dtype=dtype)
        if t.gradient_checkpointing:  # transformers 5 renamed it; older versions have only the old name
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            model.config.use_cache = False
        tokenizer = load_tokenizer(inputs["snapshot"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate,
                                      weight_decay=cfg.train.weight_decay)
        opt_state = inputs["snapshot"] / "optimizer.pt"
        if opt_state.exists():
            optimizer.load_state_dict(torch.load(opt_state, map_location="cpu"))
        elif snapshot_meta(inputs["snapshot"]).get("optimizer_pruned"):
            # redoing this step without the AdamW moments would silently train another policy
            raise SnapshotPrunedError(
                f"iteration {k} train must be redone, but {opt_state} was pruned (only the newest snapshot keeps "
                "its optimizer state); restore it, or continue from a later snapshot")
        ref_model = None
        if cfg.train.kl_coef > 0:
            ref_model = AutoModelForCausalLM.from_pretrained(inputs["reference"], dtype=dtype).eval()
            ref_model = accelerator.prepare_model(ref_model, evaluation_mode=True)
        model, optimizer = accelerator.prepare(model, optimizer)

        rows = read_table("batch", inputs["batch"]).to_pylist()
        if not rows:
            raise ValueError(f"{inputs['batch']}: the batch is empty; nothing to train on")
        metrics = train_on_batch(model, optimizer, accelerator, rows, cfg.train, seed, tokenizer.pad_token_id, ref_model,
                                 norm_length=max(cfg.rollout.max_tokens, cfg.hindsight.max_tokens or 0))

        # write the next snapshot beside its final place, then rename it into place
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            snapshot_id = hashlib.sha256(json.dumps(
                [run.run_id, k, stage_config_hash(cfg, STAGE), {n: p.name for n, p in inputs.items()},
                 metrics["loss"]], sort_keys=True).encode()).hexdigest()[:16]
            seal_snapshot(tmp, {"snapshot_id": f"{run.run_id}/policy-{k + 1}/{snapshot_id}",
                                "parent": str(inputs["snapshot"]), "iteration": k})
            if out_dir.exists():  # a killed earlier attempt finished the rename but not the manifest
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        metrics["seconds"] = time.perf_counter() - t0
        metrics["learning_rate"] = cfg.train.learning_rate
        return {"snapshot": (out_dir, metrics["sequences"]), "metrics": write_metrics(run, k, STAGE, metrics)}

    manifest = run.run_stage(k, STAGE, inputs, body)
    with run.lock():  # after the manifest: a kill before this leaves more on disk, never less
        freed = run.prune_snapshots(k)
    return {**manifest, "pruned_bytes": freed}


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE, run))
