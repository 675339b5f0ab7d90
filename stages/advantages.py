"""Advantages stage: bonus reward, hindsight mixing and group advantages, in DuckDB SQL.

docs/algorithm.md steps 6-8, all in herl/sql/advantages.sql: shape each candidate's reward with
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
import pyarrow.compute as pc

from herl.runs.rundir import Run
from herl.sql import WHITESPACE, run_sql_file, sql_file_reader
from schemas.tables import empty, open_dataset, table_writer
from stages.common import stage_main, write_metrics

STAGE = "advantages"


def sql_params(cfg, k: int) -> dict:
    """The bound parameters of advantages.sql for config `cfg` at iteration k."""
    a = cfg.advantages
    return {
        "threshold": cfg.hindsight.threshold, "skip_looping": cfg.hindsight.skip_looping,
        "tie_tolerance": cfg.hindsight.tie_tolerance, "bonus": cfg.bonus_enabled, "alpha": a.alpha,
        "replace_top_n": a.replace_top_n, "fallback": a.duplicate_best_fallback,
        "std_normalize": a.std_normalize, "eps": a.eps, "seed": f"{cfg.seed}:{k}",
        "hindsight_prompt": cfg.hindsight.train_prompt == "hindsight",
        "revision_logprobs_at_rollout_temperature": cfg.train.revision_logprob_temperature == "rollout",
        "whitespace": WHITESPACE,
    }


def compute_batch(rollouts, rewards, hindsight, params: dict):
    """The batch table (without run_id / iteration) for one iteration's tables."""
    return run_sql_file("advantages", {"rollouts": rollouts, "rewards": rewards, "hindsight": hindsight}, params)


def run(run: Run, k: int) -> dict:
    inputs = {n: run.table(k, n) for n in ("rollouts", "rewards", "hindsight")}

    def body():
        # lazily: DuckDB reads only the columns it needs, and the token lists only for the
        # rows of the batch; the batch is written as it streams out
        tables = {n: open_dataset(n, p) for n, p in inputs.items()}
        if not run.cfg.hindsight_enabled:  # plain GRPO: revisions (if any were left) are ignored
            tables["hindsight"] = empty("hindsight")
        path = run.table(k, "batch")
        narrow = []  # the columns the metrics need, per record batch
        with sql_file_reader("advantages", tables, sql_params(run.cfg, k)) as reader, \
                table_writer("batch", path) as write:
            for part in reader:
                part = pa.Table.from_batches([part])
                part = part.append_column("run_id", pa.array([run.run_id] * part.num_rows, pa.string())) \
                           .append_column("iteration", pa.array([k] * part.num_rows, pa.int32()))
                write(part)
                narrow.append(part.select(["prompt_id", "kind", "reward", "shaped_reward", "advantage"]))
        out = {"batch": (path, write.rows)}
        out["metrics"] = write_metrics(run, k, STAGE, batch_metrics(
            pa.concat_tables(narrow) if narrow else empty("batch").select(["prompt_id", "kind", "reward",
                                                                           "shaped_reward", "advantage"])))
        return out

    return run.run_stage(k, STAGE, inputs, body)


def batch_metrics(batch: pa.Table) -> dict[str, float]:
    """The stage's metrics from the batch's narrow columns (Arrow compute, no Python rows)."""
    n = batch.num_rows
    kind = batch.column("kind")
    reward, shaped, adv = (batch.column(c) for c in ("reward", "shaped_reward", "advantage"))
    bonus = pc.and_(pc.equal(kind, "rollout"), pc.not_equal(shaped, reward))
    n_bonus = pc.sum(bonus).as_py() or 0
    count = lambda value: pc.sum(pc.equal(kind, value)).as_py() or 0  # noqa: E731
    mean = lambda arr: (pc.sum(arr).as_py() or 0.0) / max(1, n)  # noqa: E731
    return {
        "sequences": n,
        "groups": pc.count_distinct(batch.column("prompt_id")).as_py() if n else 0,
        "hindsight_sequences": count("hindsight"),
        "duplicate_sequences": count("duplicate"),
        "bonus_applied": n_bonus,
        "mean_bonus": (pc.sum(pc.filter(pc.subtract(shaped, reward), bonus)).as_py() or 0.0) / n_bonus if n_bonus else 0.0,
        "mean_shaped_reward": mean(shaped),
        "mean_abs_advantage": mean(pc.abs(adv)),
        "zero_advantage_fraction": mean(pc.cast(pc.less(pc.abs(adv), 1e-9), pa.int64())),
    }


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE, run))
