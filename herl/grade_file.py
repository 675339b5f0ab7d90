"""`herl grade`: grade a file of prompts-with-responses outside training.

    herl grade --input FILE.jsonl --output OUT.parquet [--format auto] [--drop-unsupported]

Each input row holds a prompt in any supported format (herl.importers) plus a
`response` field. Writes OUT.parquet (graded_items: one row per (input row, item), with
strict and loose verdicts) and OUT.rows.parquet (graded_rows: rewards per input row),
atomically; for IFEval-format input it also reports IFEval's four accuracies
(prompt-level and instruction-level, strict and loose).
"""

from __future__ import annotations

from pathlib import Path

from herl.grading import MET, UNKNOWN, GradeInput, RubricGrader, aggregate
from herl.importers import PromptFileError, convert, read_records
from schemas.config import GradeConfig
from schemas.tables import write_table


def rows_path(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".parquet") + ".rows.parquet")


def row_scores(verdicts: list, weights: list[float], mode: str, unknown_policy: str) -> dict:
    """One answer's scores from its verdicts: strict and loose rewards, items met, all met."""
    strict = [v.verdict for v in verdicts]
    loose = [v.loose_verdict for v in verdicts]
    r_strict, met_strict, _, _ = aggregate(strict, weights, mode, unknown_policy)
    r_loose, met_loose, _, _ = aggregate(loose, weights, mode, unknown_policy)
    return {"items_total": len(verdicts), "items_met_strict": met_strict, "items_met_loose": met_loose,
            "items_unknown": sum(v == UNKNOWN for v in strict), "reward_strict": r_strict, "reward_loose": r_loose,
            "all_met_strict": all(v == MET for v in strict), "all_met_loose": all(v == MET for v in loose)}


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


def grade_file(input_path: Path, output: Path, fmt: str = "auto", drop_unsupported: bool = False,
               cfg: GradeConfig | None = None, cache_path: Path | None = None) -> dict:
    """Grade `input_path`; returns a summary {format, rows, items, metrics, grader stats}."""
    cfg = cfg or GradeConfig()
    records = read_records(input_path)
    prompts, report = convert(records, input_path, fmt, drop_unsupported)
    inputs, index = [], []
    for i, ((where, rec), prompt) in enumerate(zip(records, prompts)):
        if prompt is None:
            continue
        response = rec.get("response")
        if not isinstance(response, str):
            raise PromptFileError(f"{where}: field 'response': must be a string with the answer to grade")
        inputs.append(GradeInput(prompt["rubric"], response, prompt["messages"]))
        index.append((i, prompt))
    implicit = cfg.reward == "implicit"
    grader = RubricGrader(cfg, cache_path=cache_path)
    try:
        graded = grader.grade_many(inputs)
        # RaR implicit: one holistic judge score per row replaces the item-based reward
        holistic = grader.score_many(inputs) if implicit else [(None, "")] * len(inputs)
    finally:
        grader.close()
    fallbacks = 0

    item_rows, row_rows = [], []
    for (i, prompt), verdicts, (score, _reason) in zip(index, graded, holistic):
        for j, (item, v) in enumerate(zip(prompt["rubric"], verdicts)):
            item_rows.append({"input_row": i, "prompt_id": prompt["prompt_id"], "item_index": j,
                              "item_id": item["item_id"], "kind": item["kind"], "weight": item["weight"],
                              "verdict_strict": v.verdict, "verdict_loose": v.loose_verdict,
                              "grader": v.grader, "detail": v.detail})
        weights = [it["weight"] for it in prompt["rubric"]]
        scores = row_scores(verdicts, weights, "weighted" if implicit else cfg.reward, cfg.unknown_policy)
        if implicit:
            if score is None:
                fallbacks += 1  # no holistic score: the weighted item reward stands in, as in the grade stage
            else:
                scores["reward_strict"] = scores["reward_loose"] = score
        row_rows.append({"input_row": i, "prompt_id": prompt["prompt_id"], **scores})
    write_table("graded_items", item_rows, output)
    write_table("graded_rows", row_rows, rows_path(output))
    metrics = {**mean_rewards(row_rows), "unknown_items": sum(r["items_unknown"] for r in row_rows)}
    if report["format"] == "ifeval":
        metrics.update(ifeval_metrics(row_rows, item_rows))
    if implicit:
        metrics["implicit_fallbacks"] = fallbacks
    return {**report, "graded_rows": len(row_rows), "graded_items": len(item_rows), "metrics": metrics,
            **grader.stats(), "output": str(output), "rows_output": str(rows_path(output))}
