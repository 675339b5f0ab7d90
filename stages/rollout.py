"""Rollout stage: sample G answers per prompt from the iteration's policy snapshot.

Reads:  the prompt pool (task.source) less the held-out prompts (task.holdout) and those
        over task.max_prompt_tokens,
        snapshot k (model.path for k = 0)
Writes: iter-k/prompts.parquet   one row per prompt sampled for iteration k
        iter-k/rollouts.parquet  one row per (prompt, sample index)
        iter-k/metrics-rollout.parquet
Alone:  python -m stages.rollout runs/<run_id> --iteration K
"""

from __future__ import annotations

import time

from herl.data.pool import sample_for_iteration, task_files, training_pool
from herl.generation.engines import (
    GenRequest,
    SamplingParams,
    derive_seed,
    render_chat,
    sampling_temperature,
    shared_engine,
)
from herl.runs.rundir import Run
from schemas.tables import write_table
from stages.common import stage_main, write_metrics

STAGE = "rollout"


def run(run: Run, k: int) -> dict:
    cfg = run.cfg
    snapshot = run.snapshot(k)
    inputs = {"snapshot": snapshot}
    for i, path in enumerate(task_files(cfg.task.source)):
        inputs["task" if i == 0 else f"task-{i}"] = path

    def body():
        # held-out prompts never train; those over task.max_prompt_tokens are dropped
        pool, dropped = training_pool(cfg)
        prompts = sample_for_iteration(pool, k, cfg.task.prompts_per_iteration, cfg.seed)
        snapshot_id = run.snapshot_id(k)
        # the run's engine: started once, this snapshot's weights loaded into it when it held older ones
        engine = shared_engine(cfg.rollout.engine, snapshot, cfg.model.dtype, cfg.rollout.batch_size, cfg.vllm,
                               cfg.cluster, run.path)
        rendered = [render_chat(engine.tokenizer, p["messages"]) for p in prompts]
        requests = [
            GenRequest(p["prompt_id"], ids, derive_seed(cfg.seed, k, p["prompt_id"]), cfg.rollout.n)
            for p, (_, ids) in zip(prompts, rendered)
        ]
        params = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k,
                                cfg.rollout.max_tokens)
        t0 = time.perf_counter()
        outs = engine.generate(requests, params)
        # the vLLM engine reports its own generation time, without its start-up
        gen_seconds = getattr(engine, "last_stats", {}).get("generation_seconds", time.perf_counter() - t0)

        prompt_rows = [{"run_id": run.run_id, "iteration": k, **p} for p in prompts]
        rollout_rows = []
        for p, (text, ids), req, comps in zip(prompts, rendered, requests, outs):
            for j, c in enumerate(comps):
                rollout_rows.append({
                    "run_id": run.run_id, "iteration": k,
                    "rollout_id": f"{k}:{p['prompt_id']}:{j}", "prompt_id": p["prompt_id"], "sample_index": j,
                    "prompt_text": text, "prompt_token_ids": ids,
                    "response_text": c.text, "response_token_ids": c.token_ids,
                    "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids),
                    "seed": req.seed, "snapshot_id": snapshot_id, "logprobs": c.logprobs,
                    "temperature": sampling_temperature(cfg.rollout.temperature),
                })
        tokens = sum(r["num_tokens"] for r in rollout_rows)
        out = {
            "prompts": (run.table(k, "prompts"), write_table("prompts", prompt_rows, run.table(k, "prompts"))),
            "rollouts": (run.table(k, "rollouts"), write_table("rollouts", rollout_rows, run.table(k, "rollouts"))),
        }
        out["metrics"] = write_metrics(run, k, STAGE, {
            "prompts": len(prompt_rows),
            "prompts_dropped_too_long": dropped,  # of the training pool (task.max_prompt_tokens)
            "samples": len(rollout_rows),
            "mean_response_tokens": tokens / max(1, len(rollout_rows)),
            "stop_fraction": sum(r["finish_reason"] == "stop" for r in rollout_rows) / max(1, len(rollout_rows)),
            "generation_seconds": gen_seconds,
            "engine_vllm": float(type(engine).__name__ == "VLLMEngine"),
            "engine_startup_seconds": getattr(engine, "last_stats", {}).get("startup_seconds", 0.0),
            "engine_weight_sync_seconds": engine.sync_seconds,
            "tokens_per_second": tokens / gen_seconds if gen_seconds > 0 else 0.0,
        })
        return out

    return run.run_stage(k, STAGE, inputs, body)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE, run))
