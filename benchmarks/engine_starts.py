"""Engine start-ups per run: one engine for the whole run against a fresh one per iteration.

    python benchmarks/engine_starts.py [--model builtin:smollm2-135m-instruct] [--iterations 3]

Runs the same iterations (rollout, grade, hindsight, advantages, train; the order the
flow runs them) on the vLLM engine in two fresh runs:
  restart  the engine closed before every train stage: one start-up per iteration
           (vllm.between_iterations = restart)
  one      one engine for the run: each new snapshot's weights loaded into it in place
           (vllm.between_iterations = keep, what `auto` does on a CPU)
and prints a table: engine start-ups per run, seconds spent starting engines, seconds
spent loading weights into a running engine (per sync), seconds per iteration, and the
rollouts' identity between the two runs (they sample the same tokens: same seeds, same
weights). Needs `herl install-vllm`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from herl.generation.engines import find_vllm_python, release_engines  # noqa: E402
from herl.runs.rundir import open_run  # noqa: E402
from schemas.config import load_config  # noqa: E402
from schemas.tables import read_table  # noqa: E402
from stages import run_named_stage  # noqa: E402


def one_mode(mode: str, args, runs_dir: Path) -> dict:
    cfg = load_config("instruction_following", {
        "run_id": mode, "runs_dir": str(runs_dir), "model.path": args.model, "iterations": args.iterations,
        "task.source": "builtin:ifgen", "task.num_prompts": 64, "task.prompts_per_iteration": args.prompts,
        "rollout.engine": "vllm", "rollout.n": 4, "rollout.max_tokens": args.max_tokens,
        "hindsight.max_tokens": args.max_tokens, "hindsight.candidate_limit": 8,
        "vllm.enforce_eager": True, "vllm.cpu_kvcache_gib": 2, "vllm.tensor_parallel_size": 1,
        "vllm.between_iterations": "restart" if mode == "restart" else "keep",
        "train.mini_batches": 1, "train.micro_batch_size": 8})
    run = open_run(cfg)
    starts, startup_s, syncs, sync_s = 0, 0.0, 0, 0.0
    t0 = time.perf_counter()
    for k in range(args.iterations):
        for stage in run.cfg.iteration_stages(k):
            run_named_stage(stage, run, k)
        for stage in ("rollout", "hindsight"):
            m = {r["name"]: r["value"] for r in read_table("metrics", run.table(k, "metrics", stage)).to_pylist()}
            starts += m.get("engine_startup_seconds", 0.0) > 0
            startup_s += m.get("engine_startup_seconds", 0.0)
            syncs += m.get("engine_weight_sync_seconds", 0.0) > 0
            sync_s += m.get("engine_weight_sync_seconds", 0.0)
    release_engines()
    total = time.perf_counter() - t0
    tokens = [read_table("rollouts", run.table(k, "rollouts")).column("response_token_ids").to_pylist()
              for k in range(args.iterations)]
    return {"mode": mode, "starts": starts, "startup_s": startup_s, "syncs": syncs,
            "sync_s": sync_s / max(1, syncs), "iteration_s": total / args.iterations, "tokens": tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    if not find_vllm_python():
        print("no vLLM environment: run `herl install-vllm --cpu` first")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_mode(mode, args, Path(tmp)) for mode in ("restart", "one")]
    print(f"\n{args.model}, {args.prompts} prompts x 4 answers, up to {args.max_tokens} tokens, "
          f"{args.iterations} iterations\n")
    print("| engine | start-ups / run | start-up s / run | weight syncs | s / sync | iteration s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['starts']} | {r['startup_s']:.1f} | {r['syncs']} | {r['sync_s']:.2f} | "
              f"{r['iteration_s']:.1f} |")
    restart, one = rows
    mean_start = restart["startup_s"] / max(1, restart["starts"])
    print(f"\none start-up {mean_start:.1f} s against one weight sync {one['sync_s']:.2f} s "
          f"({mean_start / max(one['sync_s'], 1e-9):.0f}x); iteration {restart['iteration_s']:.1f} s -> "
          f"{one['iteration_s']:.1f} s ({restart['iteration_s'] / one['iteration_s']:.2f}x)")
    pairs = [(a, b) for ka, kb in zip(restart["tokens"], one["tokens"]) for a, b in zip(ka, kb)]
    print(f"rollouts identical in both runs (same seeds, same weights): {sum(a == b for a, b in pairs)} of {len(pairs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
