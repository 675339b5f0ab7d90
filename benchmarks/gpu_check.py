"""herl's train step against a plain transformers step, on a GPU, with no download.

    python benchmarks/gpu_check.py [--shapes qwen2.5-0.5b,qwen2.5-1.5b] [--sequences 16]
        [--prompt-tokens 256 --response-tokens 256] [--steps 3] [--variants full,full_gc,lora,lora_gc]

For each model shape (a randomly initialised Qwen2, or Llama for smollm2-135m, built from
the published config's sizes: nothing is fetched) and each variant (full fine-tuning or LoRA rank 16, with or
without gradient checkpointing), it times one optimizer step of

- herl: `train_on_batch` (herl/training/trainer.py) on one mini-batch of random
  sequences, the model wrapped as the train job wraps it (ResponseLogprobs, prepared by
  accelerate), one PPO epoch (so no extra old-log-prob pass);
- plain: the same sequences through `model(input_ids, labels=...)` (full-vocabulary
  logits and cross-entropy), backward, AdamW step;

in bf16 mixed precision on a GPU (float32 on a CPU), after one warm-up step each, and
prints a table: tokens/s (prompt + response tokens of the batch per second), peak GPU
memory, and herl's tokens/s over plain's. Needs torch, transformers, accelerate and peft;
vLLM and Prefect may be absent. The tests run it on a CPU in the `tiny` shape so that it
cannot rot; on one H100 the two real shapes take a few minutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# sizes from the models' published config.json (no weights: randomly initialised)
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # SmolLM2-135M-Instruct's (a Llama): the CPU comparison of herl's step with a plain one
    "smollm2-135m": dict(architecture="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True),
}
VARIANTS = {"full": (0, False), "full_gc": (0, True), "lora": (16, False), "lora_gc": (16, True)}


def build(shape: str, lora_rank: int, checkpointing: bool, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    sizes = dict(SHAPES[shape])
    config, causal_lm = (LlamaConfig, LlamaForCausalLM) if sizes.pop("architecture", "qwen2") == "llama" \
        else (Qwen2Config, Qwen2ForCausalLM)
    model = causal_lm(config(**sizes, max_position_embeddings=4096)).to(device)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    if checkpointing:
        inner = model.get_base_model() if lora_rank else model
        enable = getattr(inner, "activation_checkpointing_enable", None) or inner.gradient_checkpointing_enable
        enable()
        inner.config.use_cache = False
        if lora_rank:
            inner.enable_input_require_grads()
    return model


def batch(shape: str, n: int, prompt: int, response: int) -> list[dict]:
    import random

    rng = random.Random(0)
    vocab = SHAPES[shape]["vocab_size"]
    return [{"prompt_id": f"p{i // 4}", "prompt_token_ids": [rng.randrange(3, vocab) for _ in range(prompt)],
             "response_token_ids": [rng.randrange(3, vocab) for _ in range(response)],
             "advantage": 1.0 if i % 2 else -1.0, "is_hindsight": i % 8 == 7, "engine_logprobs": None,
             "temperature": 1.0} for i in range(n)]


def time_steps(step, steps: int, device) -> tuple[float, float]:
    """(median seconds per step after one warm-up, peak GPU GB or nan)."""
    import torch

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def herl_step(shape: str, variant: str, rows: list[dict], steps: int) -> tuple[float, float]:
    """herl: the train job's wrapping and one update over one mini-batch."""
    import torch
    from accelerate import Accelerator

    from herl.training.batching import ResponseLogprobs
    from herl.training.trainer import train_on_batch
    from schemas.config import TrainConfig

    gpu = torch.cuda.is_available()
    precision = "bf16" if gpu else "no"
    rank, gc = VARIANTS[variant]
    acc = Accelerator(cpu=not gpu, mixed_precision=precision)
    model = build(shape, rank, gc, acc.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    wrapped, opt = acc.prepare(ResponseLogprobs(model), opt)
    cfg = TrainConfig(mini_batches=1, micro_batch_size=len(rows), kl_coef=0.0, mixed_precision=precision,
                      gradient_checkpointing=gc)
    return time_steps(lambda: train_on_batch(wrapped, opt, acc, [dict(r) for r in rows], cfg, 0, pad_id=0),
                      steps, acc.device)


def plain_step(shape: str, variant: str, rows: list[dict], steps: int) -> tuple[float, float]:
    """plain: transformers' own loss over the full vocabulary, backward, AdamW."""
    import torch
    from accelerate import Accelerator

    gpu = torch.cuda.is_available()
    rank, gc = VARIANTS[variant]
    acc = Accelerator(cpu=not gpu, mixed_precision="bf16" if gpu else "no")
    model = build(shape, rank, gc, acc.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model, opt = acc.prepare(model, opt)
    width = max(len(r["prompt_token_ids"]) + len(r["response_token_ids"]) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T), right-padded
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)  # loss on response tokens only
    for b, r in enumerate(rows):
        seq = r["prompt_token_ids"] + r["response_token_ids"]
        ids[b, : len(seq)] = torch.tensor(seq)
        attn[b, : len(seq)] = 1
        labels[b, len(r["prompt_token_ids"]): len(seq)] = torch.tensor(r["response_token_ids"])
    ids, attn, labels = ids.to(acc.device), attn.to(acc.device), labels.to(acc.device)

    def step():
        model.train()
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_steps(step, steps, acc.device)


def measure(shape: str, variant: str, rows: list[dict], steps: int) -> dict:
    import torch

    tokens = sum(len(r["prompt_token_ids"]) + len(r["response_token_ids"]) for r in rows)
    out = {"shape": shape, "variant": variant, "tokens": tokens}
    out["herl_s"], out["herl_peak_gb"] = herl_step(shape, variant, rows, steps)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out["plain_s"], out["plain_peak_gb"] = plain_step(shape, variant, rows, steps)
    out["herl_tok_s"], out["plain_tok_s"] = tokens / out["herl_s"], tokens / out["plain_s"]
    out["ratio"] = out["herl_tok_s"] / out["plain_tok_s"]
    return out


def table(results: list[dict]) -> str:
    lines = ["| shape | variant | herl tokens/s | plain tokens/s | herl / plain | herl peak GB | plain peak GB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['shape']} | {r['variant']} | {r['herl_tok_s']:.0f} | {r['plain_tok_s']:.0f} | "
                     f"{r['ratio']:.2f}x | {r['herl_peak_gb']:.2f} | {r['plain_peak_gb']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--response-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (float32)"
    print(f"device: {device}; {args.sequences} sequences x ({args.prompt_tokens} + {args.response_tokens}) tokens, "
          f"median of {args.steps} steps after a warm-up\n", flush=True)
    results = []
    for shape in args.shapes.split(","):
        rows = batch(shape, args.sequences, args.prompt_tokens, args.response_tokens)
        for variant in args.variants.split(","):
            results.append(measure(shape, variant, rows, args.steps))
            print(f"{shape} {variant}: herl {results[-1]['herl_tok_s']:.0f} tok/s, plain "
                  f"{results[-1]['plain_tok_s']:.0f} tok/s", flush=True)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
