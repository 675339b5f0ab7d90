"""Grade stage: a verdict for every (answer, rubric item), and a reward per answer.

Reads:  iter-k/prompts.parquet, iter-k/rollouts.parquet
Writes: iter-k/verdicts.parquet  one row per (rollout, rubric item)
        iter-k/rewards.parquet   one row per rollout
        iter-k/metrics-grade.parquet
Alone:  python -m stages.grade runs/<run_id> --iteration K
"""

from __future__ import annotations

from collections import Counter

from herl.grading.checks import UNKNOWN
from herl.grading.rubric import grade_samples
from herl.runs.rundir import Run
from schemas.tables import read_table, write_table
from stages.common import stage_main, write_metrics

STAGE = "grade"


def run(run: Run, k: int) -> dict:
    inputs = {"prompts": run.table(k, "prompts"), "rollouts": run.table(k, "rollouts")}

    def body():
        prompts = read_table("prompts", inputs["prompts"]).to_pylist()
        rollouts = read_table("rollouts", inputs["rollouts"]).select(["rollout_id", "prompt_id", "response_text"])
        samples = list(zip(*(rollouts.column(c).to_pylist() for c in rollouts.column_names)))
        verdict_rows, scores, grader_stats = grade_samples(run.run_id, run.judge_cache, k, {p["prompt_id"]: p for p in prompts}, samples,
                                                           run.cfg.grade)
        prompt_of = {sid: pid for sid, pid, _ in samples}
        reward_rows = [{"run_id": run.run_id, "iteration": k, "rollout_id": sid, "prompt_id": prompt_of[sid], **s}
                       for sid, s in scores.items()]
        counts = Counter(v["verdict"] for v in verdict_rows)
        best: dict[str, float] = {}  # plain rewards (the hindsight stage's groups_failed applies the repetition rule)
        for r in reward_rows:
            best[r["prompt_id"]] = max(best.get(r["prompt_id"], 0.0), r["reward"])
        n = max(1, len(reward_rows))
        out = {
            "verdicts": (run.table(k, "verdicts"), write_table("verdicts", verdict_rows, run.table(k, "verdicts"))),
            "rewards": (run.table(k, "rewards"), write_table("rewards", reward_rows, run.table(k, "rewards"))),
        }
        out["metrics"] = write_metrics(run, k, STAGE, {
            "mean_reward": sum(r["reward"] for r in reward_rows) / n,
            "solved_fraction": sum(r["reward"] >= 1.0 for r in reward_rows) / n,
            "groups_failed": sum(b < run.cfg.hindsight.threshold for b in best.values()),
            "mean_group_best": sum(best.values()) / max(1, len(best)),
            # answers whose last 160 characters occur 3+ times (rewards.looped)
            "looped_fraction": sum(r["looped"] for r in reward_rows) / n,
            "verdicts_met": counts["met"], "verdicts_unmet": counts["unmet"], "verdicts_unknown": counts[UNKNOWN],
            **grader_stats,
        })
        return out

    return run.run_stage(k, STAGE, inputs, body)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE, run))
