"""Engine start-ups per iteration: one engine per generating stage vs one shared by them.

    python benchmarks/engine_starts.py [--model builtin:smollm2-135m-instruct] [--iterations 1]

Runs the same iterations twice on the vLLM engine (rollout, grade, hindsight,
advantages, train; the order the flow runs them), in two fresh runs:
  per-stage  the engine closed after every stage, so rollout and hindsight each start
             one (what herl did before engines were shared)
  shared     the engine kept open from rollout to hindsight and released before train
             (herl.engines.shared_engine / release_engines, as the flow does)
and prints a table: engine starts, seconds spent starting engines, iteration seconds,
and start-up's share of the iteration. Needs `herl install-vllm`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from herl.engines import find_vllm_python, release_engines  # noqa: E402
from herl.rundir import open_run  # noqa: E402
from schemas.config import load_config  # noqa: E402
from schemas.stages import iteration_stages  # noqa: E402
from schemas.tables import read_table  # noqa: E402
from stages import run_stage  # noqa: E402


def one_mode(mode: str, args, runs_dir: Path) -> dict:
    cfg = load_config("instruction_following", {
        "run_id": mode, "runs_dir": str(runs_dir), "model.path": args.model, "iterations": args.iterations,
        "task.source": "builtin:ifgen", "task.num_prompts": 64, "task.prompts_per_iteration": args.prompts,
        "rollout.engine": "vllm", "rollout.n": 4, "rollout.max_tokens": args.max_tokens,
        "hindsight.max_tokens": args.max_tokens, "hindsight.candidate_limit": 8,
        "vllm.enforce_eager": True, "vllm.cpu_kvcache_gib": 2, "vllm.tensor_parallel_size": 1, "train.mini_batches": 1, "train.micro_batch_size": 8})
    run = open_run(cfg)
    starts, startup_s = 0, 0.0
    t0 = time.perf_counter()
    for k in range(args.iterations):
        for stage in iteration_stages(run.cfg, k):
            run_stage(stage, run, k)
            if mode == "per-stage":
                release_engines()
        for stage in ("rollout", "hindsight"):
            m = {r["name"]: r["value"] for r in read_table("metrics", run.table(k, "metrics", stage)).to_pylist()}
            s = m.get("engine_startup_seconds", 0.0)
            starts += s > 0
            startup_s += s
    release_engines()
    total = time.perf_counter() - t0
    return {"mode": mode, "starts": starts / args.iterations, "startup_s": startup_s / args.iterations,
            "iteration_s": total / args.iterations}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--iterations", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    if not find_vllm_python():
        print("no vLLM environment: run `herl install-vllm --cpu` first")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_mode(mode, args, Path(tmp)) for mode in ("per-stage", "shared")]
    print(f"\n{args.model}, {args.prompts} prompts x 4 answers, up to {args.max_tokens} tokens, "
          f"{args.iterations} iteration(s), averages per iteration\n")
    print("| engines | starts / iteration | start-up s | iteration s | start-up share |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['starts']:.0f} | {r['startup_s']:.1f} | {r['iteration_s']:.1f} | "
              f"{r['startup_s'] / r['iteration_s']:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
