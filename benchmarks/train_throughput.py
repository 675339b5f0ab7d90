"""Train-job throughput and memory: full fine-tune vs LoRA vs gradient checkpointing.

    python benchmarks/train_throughput.py [--model builtin:smollm2-135m-instruct]
        [--sequences 32 --prompt-tokens 256 --response-tokens 256]

Writes one synthetic iteration (random token ids, groups of 4, advantages +-1) into a
run folder and runs the train stage on it, as the flow
does (a launched job), once per variant. Prints a table of the job's update tokens/s, its
peak resident memory (CPU; includes ~0.5 GB of imported libraries) or peak GPU memory,
and the snapshot's size on disk. The numbers are the job's own metrics
(update_seconds, tokens_per_second, peak_rss_gb), also in every run's metrics-train table.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from herl.runs.rundir import open_run  # noqa: E402
from schemas.config import load_config  # noqa: E402
from schemas.tables import read_table, write_table  # noqa: E402
from stages import train  # noqa: E402

VARIANTS = {
    "full": {},
    "full + gradient checkpointing": {"train.gradient_checkpointing": True},
    "LoRA r=8": {"train.lora.rank": 8},
    "LoRA r=8 + gradient checkpointing": {"train.lora.rank": 8, "train.gradient_checkpointing": True},
}


def synthetic_iteration(run, n: int, prompt_tokens: int, response_tokens: int, vocab: int, seed: int = 0) -> None:
    """Rollouts (the token lists), an empty hindsight table and the batch that refers to them."""
    rng = random.Random(seed)
    rollouts, batch = [], []
    for i in range(n):
        rollouts.append({
            "run_id": run.run_id, "iteration": 0, "rollout_id": f"s{i}", "prompt_id": f"p{i // 4}", "sample_index": i % 4,
            "prompt_text": "", "prompt_token_ids": [rng.randrange(vocab) for _ in range(prompt_tokens)],
            "response_text": "", "response_token_ids": [rng.randrange(vocab) for _ in range(response_tokens)],
            "finish_reason": "length", "num_tokens": response_tokens, "seed": 0, "snapshot_id": "s", "logprobs": None,
            "temperature": 1.0})
        batch.append({
            "run_id": run.run_id, "iteration": 0, "sample_id": f"s{i}", "rollout_id": f"s{i}", "revision_id": None,
            "prompt_id": f"p{i // 4}", "kind": "rollout", "is_hindsight": False, "hindsight_prompt": False,
            "replaced_rollout_id": None, "temperature": 1.0, "reward": 0.5, "shaped_reward": 0.5, "group_mean": 0.5,
            "group_std": 0.5, "group_size": 4, "advantage": 1.0 if i % 4 < 2 else -1.0})
    write_table("rollouts", rollouts, run.table(0, "rollouts"))
    write_table("hindsight", [], run.table(0, "hindsight"))
    write_table("batch", batch, run.table(0, "batch"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--response-tokens", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            cfg = load_config(None, {"run_id": f"v{len(results)}", "runs_dir": tmp, "model.path": args.model,
                                     "iterations": 1, "train.mini_batches": 1, "train.micro_batch_size": args.micro_batch,
                                     "train.micro_batch_tokens": None, **VARIANTS[name]})
            run = open_run(cfg)
            from transformers import AutoConfig

            vocab = AutoConfig.from_pretrained(run.snapshot(0)).vocab_size
            synthetic_iteration(run, args.sequences, args.prompt_tokens, args.response_tokens, vocab)
            train.run(run, 0)
            m = {r["name"]: r["value"] for r in read_table("metrics", run.table(0, "metrics", "train")).to_pylist()}
            disk = sum(f.stat().st_size for f in run.snapshot(1).rglob("*") if f.is_file())
            results.append((name, m))
            print(f"{name}: {m['tokens_per_second']:.0f} tokens/s, peak RSS {m['peak_rss_gb']:.2f} GB, "
                  f"snapshot {disk / 1e6:.1f} MB", flush=True)
            m["snapshot_mb"] = disk / 1e6
    print(f"\n{args.model}: {args.sequences} sequences x ({args.prompt_tokens} prompt + {args.response_tokens} "
          f"response tokens), micro-batches of {args.micro_batch}, one optimizer step\n")
    gpu = "peak_gpu_memory_gb" in results[0][1]
    print(f"| variant | update s | response tokens/s | peak RSS GB |{' peak GPU GB |' if gpu else ''} snapshot MB |")
    print(f"|---|---|---|---|{'---|' if gpu else ''}---|")
    for name, m in results:
        print(f"| {name} | {m['update_seconds']:.1f} | {m['tokens_per_second']:.0f} | {m['peak_rss_gb']:.2f} |"
              + (f" {m['peak_gpu_memory_gb']:.2f} |" if gpu else "") + f" {m['snapshot_mb']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
