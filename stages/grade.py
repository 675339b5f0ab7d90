"""Grade stage: a verdict for every (answer, rubric item), and a reward per answer.

Reads:  iter-k/prompts.parquet, iter-k/rollouts.parquet
Writes: iter-k/verdicts.parquet  one row per (rollout, rubric item)
        iter-k/rewards.parquet   one row per rollout
        iter-k/metrics-grade.parquet
Alone:  python -m stages.grade runs/<run_id> --iteration K
"""

from __future__ import annotations

from collections import Counter

from herl.grading import UNKNOWN, GradeInput, RubricGrader
from herl.rundir import Run
from herl.scoring import score_answers, used_verdicts
from schemas.config import GradeConfig
from schemas.tables import read_table, write_table
from stages.common import stage_main, write_metrics

STAGE = "grade"


def grade_samples(run: Run, k: int, prompts: dict[str, dict], samples: list[tuple[str, str, str]],
                  cfg: GradeConfig) -> tuple[list[dict], dict[str, dict], dict[str, float]]:
    """Grade (sample_id, prompt_id, response) triples against their prompt's rubric.

    Returns verdict rows (verdicts schema), {sample_id: {reward, items_met, items_total,
    items_unknown}} and grader statistics. Shared by the grade and hindsight stages so
    that answers and revisions are scored by the same grader.
    """
    grader = RubricGrader(cfg, cache_path=run.path / "judge_cache.sqlite")
    inputs = [GradeInput(prompts[pid]["rubric"], response, prompts[pid]["messages"]) for _, pid, response in samples]
    try:
        graded, rows, fallbacks = score_answers(grader, inputs, cfg)
    finally:
        grader.close()
    verdict_rows, scores = [], {}
    for (sample_id, prompt_id, _), verdicts, row in zip(samples, graded, rows):
        rubric = prompts[prompt_id]["rubric"]
        for j, (item, v, u) in enumerate(zip(rubric, verdicts, used_verdicts(verdicts, cfg.mode))):
            verdict_rows.append({
                "run_id": run.run_id, "iteration": k, "sample_id": sample_id, "prompt_id": prompt_id,
                "item_index": j, "item_id": item["item_id"], "verdict": u, "verdict_strict": v.verdict,
                "verdict_loose": v.loose_verdict, "weight": item["weight"], "grader": v.grader, "detail": v.detail,
            })
        # items_total counts the items the reward is over: unknown ones leave it under unknown_policy = drop
        dropped = row["items_unknown"] if cfg.unknown_policy == "drop" else 0
        scores[sample_id] = {"reward": row[f"reward_{cfg.mode}"], "items_met": row[f"items_met_{cfg.mode}"],
                             "items_total": row["items_total"] - dropped, "items_unknown": row["items_unknown"]}
    stats = grader.stats()
    if cfg.reward == "implicit":
        stats["implicit_fallbacks"] = fallbacks
    return verdict_rows, scores, stats


def run(run: Run, k: int) -> dict:
    inputs = {"prompts": run.table(k, "prompts"), "rollouts": run.table(k, "rollouts")}

    def body():
        prompts = read_table("prompts", inputs["prompts"]).to_pylist()
        rollouts = read_table("rollouts", inputs["rollouts"]).select(["rollout_id", "prompt_id", "response_text"])
        samples = list(zip(*(rollouts.column(c).to_pylist() for c in rollouts.column_names)))
        verdict_rows, scores, grader_stats = grade_samples(run, k, {p["prompt_id"]: p for p in prompts}, samples,
                                                           run.cfg.grade)
        prompt_of = {sid: pid for sid, pid, _ in samples}
        reward_rows = [{"run_id": run.run_id, "iteration": k, "rollout_id": sid, "prompt_id": prompt_of[sid], **s}
                       for sid, s in scores.items()]
        counts = Counter(v["verdict"] for v in verdict_rows)
        best: dict[str, float] = {}
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
            "verdicts_met": counts["met"], "verdicts_unmet": counts["unmet"], "verdicts_unknown": counts[UNKNOWN],
            **grader_stats,
        })
        return out

    return run.run_stage(k, STAGE, inputs, body)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE, run))
