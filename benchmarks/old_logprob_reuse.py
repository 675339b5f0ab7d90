"""The train step with and without the old-log-prob pass of the first mini-batch.

    python benchmarks/old_logprob_reuse.py [--model builtin:smollm2-135m-instruct]
        [--sequences 16 --prompt-tokens 128 --response-tokens 128 --mini-batches 2 --reps 3]
        [--lora-rank 16]

With one PPO epoch, herl takes epoch 0's first mini-batch's old log-probs from that
mini-batch's own forward (herl/training/trainer.py, train_on_batch) instead of a separate
no-grad pass. This times one update (train_on_batch: old-log-prob pass plus optimizer
steps) both ways on the same synthetic batch, interleaved (A, B, A, B, ...) so that a
busy machine slows both alike, and prints seconds per update (median and range), the
ratio, and the largest difference of the updated weights. It also prints what the pass
costs against an optimizer step over as many sequences (the time saved, over one
mini-batch's share of the update): about 1/3 for a full fine-tune, where the backward
pass costs two forwards (gradients of activations and of weights), and nearer 1/2 with
LoRA (`--lora-rank`), where the frozen weights need no gradient and the backward costs
about one forward.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from herl.models.paths import resolve_model_path
    from herl.models.tokenizer import load_tokenizer
    from herl.training import trainer
    from schemas.config import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--response-tokens", type=int, default=128)
    ap.add_argument("--mini-batches", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lora-rank", type=int, default=0, help="train a LoRA adapter of this rank (alpha 2r) on every linear layer")
    args = ap.parse_args(argv)

    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    rng = random.Random(0)
    vocab = min(tok.vocab_size, 30000)
    rows = [{"prompt_id": f"p{i // 4}", "prompt_token_ids": [rng.randrange(vocab) for _ in range(args.prompt_tokens)],
             "response_token_ids": [rng.randrange(vocab) for _ in range(args.response_tokens)],
             "advantage": 1.0 if i % 2 else -1.0, "is_hindsight": False, "engine_logprobs": None, "temperature": 1.0}
            for i in range(args.sequences)]
    cfg = TrainConfig(mini_batches=args.mini_batches, micro_batch_size=8, kl_coef=0.0, learning_rate=1e-5)
    first = trainer._first_minibatch

    def update(reuse: bool) -> tuple[float, torch.Tensor]:
        trainer._first_minibatch = first if reuse else (lambda *a: [])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path)
        if args.lora_rank:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
        t0 = time.perf_counter()
        trainer.train_on_batch(model, opt, Accelerator(cpu=True), [dict(r) for r in rows], cfg, 0, tok.pad_token_id)
        seconds = time.perf_counter() - t0
        return seconds, torch.cat([p.detach().flatten() for p in model.parameters()])

    times: dict[bool, list[float]] = {True: [], False: []}
    weights: dict[bool, torch.Tensor] = {}
    for _ in range(args.reps):
        for reuse in (False, True):
            seconds, weights[reuse] = update(reuse)
            times[reuse].append(seconds)
    trainer._first_minibatch = first
    tokens = args.sequences * args.response_tokens
    kind = f"LoRA r{args.lora_rank}" if args.lora_rank else "full fine-tune"
    print(f"{path.name}, {kind}: {args.sequences} sequences x ({args.prompt_tokens} + {args.response_tokens}) tokens, "
          f"{args.mini_batches} mini-batches, {args.reps} interleaved reps\n")
    print("| old log-probs of the first mini-batch | s per update (median, range) | response tokens/s |")
    print("|---|---|---|")
    for reuse, name in ((False, "extra no-grad pass (before)"), (True, "from its own forward (now)")):
        t = times[reuse]
        print(f"| {name} | {statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) | {tokens / statistics.median(t):.0f} |")
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    print(f"\nspeed-up {ratio:.2f}x; largest weight difference after the update "
          f"{float((weights[True] - weights[False]).abs().max()):.2e}")
    saved = statistics.median(times[False]) - statistics.median(times[True])  # the pass over one mini-batch
    per_minibatch = statistics.median(times[True]) / args.mini_batches  # an optimizer step over as many
    print(f"the no-grad pass over one mini-batch ({args.sequences // args.mini_batches} sequences): {saved:.2f} s, "
          f"{saved / per_minibatch:.2f}x an optimizer step over as many ({per_minibatch:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
