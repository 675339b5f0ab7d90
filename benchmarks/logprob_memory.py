"""Peak memory of the train stage's log-probs: the full (B, L, V) logits vs the head at
response positions only, in chunks (herl/training/batching.py `sequence_logprobs`), and the latter
with gradient checkpointing (train.gradient_checkpointing).

    python benchmarks/logprob_memory.py [--model builtin:smollm2-135m-instruct] [--batch 8]
        [--prompt 512] [--response 96]

Each variant runs in its own process (forward + backward of the summed log-probs, float32)
and reports its peak RSS above the loaded model, and the time of one pass. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(model: str, batch: int, prompt: int, response: int, lean: bool, checkpointing: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import herl.training.batching as train_mod
    from herl.models.paths import resolve_model_path

    path = resolve_model_path(model)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    vocab = m.config.vocab_size
    if checkpointing:
        (getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable)()
        m.config.use_cache = False
        m.train()
    if not lean:
        train_mod._decoder_and_head = lambda _m: None  # the full-logits path
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in range(batch)]
    responses = [torch.randint(0, vocab, (response,), generator=g).tolist() for _ in range(batch)]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    logp, mask = train_mod.sequence_logprobs(m, prompts, responses, 0)
    (logp * mask).sum().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    name = ("lean" if lean else "full logits") + (" + gradient checkpointing" if checkpointing else "")
    return {"variant": name, "peak_mb_above_model": (peak - base) / 1024,
            "seconds": seconds, "vocab": vocab}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--response", type=int, default=96)
    ap.add_argument("--one", choices=["lean", "full", "lean_ckpt"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.batch, args.prompt, args.response, args.one != "full",
                                 args.one == "lean_ckpt")))
        return 0
    rows = []
    for variant in ("full", "lean", "lean_ckpt"):
        out = subprocess.run([sys.executable, __file__, "--one", variant, "--model", args.model, "--batch",
                              str(args.batch), "--prompt", str(args.prompt), "--response", str(args.response)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.model}, vocabulary {rows[0]['vocab']}: {args.batch} sequences x ({args.prompt} prompt + "
          f"{args.response} response) tokens, forward + backward, float32\n")
    print("| variant | peak RSS above the model (MB) | seconds |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['peak_mb_above_model']:.0f} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
