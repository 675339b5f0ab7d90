"""Advantages stage: bonus reward, hindsight mixing and group advantages, in DuckDB SQL.

docs/algorithm.md steps 6-8, all in stages/sql/advantages.sql: shape each candidate's reward with
the bonus (algorithm herl), put up to replace_top_n qualifying revisions into each
failed group in place of random members (or copies of the best original, the reference
fallback), then compute GRPO advantages over the mixed groups. Replaced members stay in
`rollouts`; they are simply absent from `batch`.

Reads:  iter-k/rollouts, rewards, hindsight
Writes: iter-k/batch.parquet   one row per training sequence
        iter-k/metrics-advantages.parquet
Alone:  python -m stages.advantages runs/<run_id> --iteration K
"""

from __future__ import annotations

import pyarrow as pa

from herl.engines import sampling_temperature
from herl.rundir import Run
from herl.sql import run_sql_file
from schemas.tables import read_table, write_table
from stages.common import stage_main, write_metrics

STAGE = "advantages"


def sql_params(cfg, k: int) -> dict:
    """The bound parameters of advantages.sql for config `cfg` at iteration k."""
    a = cfg.advantages
    return {
        "threshold": cfg.hindsight.threshold, "bonus": cfg.bonus_enabled, "alpha": a.alpha,
        "replace_top_n": a.replace_top_n, "fallback": a.duplicate_best_fallback,
        "std_normalize": a.std_normalize, "eps": a.eps, "seed": f"{cfg.seed}:{k}",
        "hindsight_prompt": cfg.hindsight.train_prompt == "hindsight",
        "rollout_temperature": sampling_temperature(cfg.rollout.temperature),
        "hindsight_temperature": sampling_temperature(cfg.hindsight.temperature),
    }


def compute_batch(rollouts, rewards, hindsight, params: dict):
    """The batch table (without run_id / iteration) for one iteration's tables."""
    return run_sql_file("advantages", {"rollouts": rollouts, "rewards": rewards, "hindsight": hindsight}, params)


def run(run: Run, k: int) -> dict:
    inputs = {n: run.table(k, n) for n in ("rollouts", "rewards", "hindsight")}

    def body():
        tables = {n: read_table(n, p) for n, p in inputs.items()}
        if not run.cfg.hindsight_enabled:  # plain GRPO: revisions (if any were left) are ignored
            tables["hindsight"] = tables["hindsight"].schema.empty_table()
        batch = compute_batch(tables["rollouts"], tables["rewards"], tables["hindsight"], sql_params(run.cfg, k))
        n_rows = batch.num_rows
        batch = batch.append_column("run_id", pa.array([run.run_id] * n_rows, pa.string())) \
                     .append_column("iteration", pa.array([k] * n_rows, pa.int32()))
        rows = batch.to_pylist()
        kinds = [r["kind"] for r in rows]
        shaped = [r for r in rows if r["kind"] == "rollout" and r["shaped_reward"] != r["reward"]]
        out = {"batch": (run.table(k, "batch"), write_table("batch", batch, run.table(k, "batch")))}
        n = max(1, len(rows))
        out["metrics"] = write_metrics(run, k, STAGE, {
            "sequences": len(rows),
            "groups": len({r["prompt_id"] for r in rows}),
            "hindsight_sequences": kinds.count("hindsight"),
            "duplicate_sequences": kinds.count("duplicate"),
            "bonus_applied": len(shaped),
            "mean_bonus": sum(r["shaped_reward"] - r["reward"] for r in shaped) / len(shaped) if shaped else 0.0,
            "mean_shaped_reward": sum(r["shaped_reward"] for r in rows) / n,
            "mean_abs_advantage": sum(abs(r["advantage"]) for r in rows) / n,
            "zero_advantage_fraction": sum(abs(r["advantage"]) < 1e-9 for r in rows) / n,
        })
        return out

    return run.run_stage(k, STAGE, inputs, body)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE, run))
