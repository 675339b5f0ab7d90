"""Per-answer scores from rubric verdicts: one definition for the grade stage (training
rewards), `herl grade` and `herl eval` / the held-out evaluation, so that a score means
the same thing wherever it is reported.

An answer's scores are its reward under its strict and under its loose verdicts
(aggregated as `grade.reward` says; `implicit` takes the judge's holistic score, with the
weighted item reward standing in where none could be had), the items met under each, the
unknown items, and whether every item was met.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from herl.grading import MET, UNKNOWN, GradeInput, RubricGrader, Verdict, aggregate
from schemas.config import GradeConfig

if TYPE_CHECKING:
    from herl.rundir import Run


def used_verdicts(verdicts: list[Verdict], mode: str) -> list[str]:
    """The verdicts rewards and hindsight prompts use: strict, or IFEval's loose (grade.mode)."""
    return [v.loose_verdict if mode == "loose" else v.verdict for v in verdicts]


def row_scores(verdicts: list[Verdict], weights: list[float], reward: str, unknown_policy: str,
               pitfalls: str = "subtract") -> dict:
    """One answer's scores from its verdicts: strict and loose rewards, items met, all met.

    `reward` is an item aggregation (weighted, fraction, all); an implicit reward is put in
    by score_answers."""
    strict = used_verdicts(verdicts, "strict")
    loose = used_verdicts(verdicts, "loose")
    r_strict, met_strict, _, _ = aggregate(strict, weights, reward, unknown_policy, pitfalls)
    r_loose, met_loose, _, _ = aggregate(loose, weights, reward, unknown_policy, pitfalls)
    return {"items_total": len(verdicts), "items_met_strict": met_strict, "items_met_loose": met_loose,
            "items_unknown": sum(v == UNKNOWN for v in strict), "reward_strict": r_strict, "reward_loose": r_loose,
            "all_met_strict": all(v == MET for v in strict), "all_met_loose": all(v == MET for v in loose)}


def score_answers(grader: RubricGrader, inputs: list[GradeInput],
                  cfg: GradeConfig) -> tuple[list[list[Verdict]], list[dict], int]:
    """Grade `inputs` and score each answer as `cfg.reward` says.

    Returns (verdicts per answer, row_scores per answer, implicit fallbacks): with
    reward = implicit the judge's holistic score replaces both rewards, and where none could
    be had the weighted item reward stands in and is counted as a fallback."""
    implicit = cfg.reward == "implicit"
    graded = grader.grade_many(inputs)  # item verdicts: hindsight prompts need them whatever the reward
    holistic = grader.score_many(inputs) if implicit else [(None, "")] * len(inputs)
    rows, fallbacks = [], 0
    for inp, verdicts, (score, _reason) in zip(inputs, graded, holistic, strict=True):
        scores = row_scores(verdicts, [it["weight"] for it in inp.rubric], "weighted" if implicit else cfg.reward,
                            cfg.unknown_policy, cfg.pitfalls)
        if implicit:
            if score is None:
                fallbacks += 1
            else:
                scores["reward_strict"] = scores["reward_loose"] = score
        rows.append(scores)
    return graded, rows, fallbacks


def mean_rewards(rows: list[dict]) -> dict[str, float]:
    n = max(1, len(rows))
    return {"mean_reward_strict": sum(r["reward_strict"] for r in rows) / n,
            "mean_reward_loose": sum(r["reward_loose"] for r in rows) / n}


def ifeval_metrics(rows: list[dict], items: list[dict]) -> dict[str, float]:
    """IFEval's accuracies: prompt-level (all instructions followed) and instruction-level."""
    n_rows, n_items = max(1, len(rows)), max(1, len(items))
    return {
        "prompt_level_strict": sum(r["all_met_strict"] for r in rows) / n_rows,
        "prompt_level_loose": sum(r["all_met_loose"] for r in rows) / n_rows,
        "instruction_level_strict": sum(i["verdict_strict"] == MET for i in items) / n_items,
        "instruction_level_loose": sum(i["verdict_loose"] == MET for i in items) / n_items,
    }


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
