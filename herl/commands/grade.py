"""`herl grade`: grade a file of prompts-with-responses outside training.

    herl grade --input FILE.jsonl --output OUT.parquet [--format auto] [--drop-unsupported]
               [--responses RESPONSES.jsonl]

Each input row holds a prompt in any supported format (herl.data.importers) plus a
`response` field, or, as IFEval's and IFBench's own evaluators take them, the responses
come from a second file (`--responses`: one {prompt, response} object per line, matched
to the input rows by prompt text; a prompt without a response follows nothing). Writes OUT.parquet (graded_items: one row per (input row, item), with
strict and loose verdicts) and OUT.rows.parquet (graded_rows: rewards per input row),
atomically; for IFEval-format input it also reports IFEval's four accuracies
(prompt-level and instruction-level, strict and loose).
"""

from __future__ import annotations

from pathlib import Path

from herl.data.importers import PromptFileError, convert, read_records
from herl.grading.rubric import (
    GradeInput,
    RubricGrader,
    ifeval_metrics,
    mean_rewards,
    score_answers,
    user_prompt,
)
from schemas.config import GradeConfig
from schemas.tables import write_table


def rows_path(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".parquet") + ".rows.parquet")


def read_responses(path: Path) -> dict[str, str]:
    """{prompt: response} from a JSONL of {prompt, response} objects (IFEval's and IFBench's
    `--input_response_data`); a prompt is also found by its text without surrounding spaces."""
    out: dict[str, str] = {}
    for where, rec in read_records(path):
        for field in ("prompt", "response"):
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise PromptFileError(f"{where}: field {field!r}: must be a string")
        out[rec["prompt"]] = rec["response"]
        out.setdefault(rec["prompt"].strip(), rec["response"])
    return out


def grade_file(input_path: Path, output: Path, fmt: str = "auto", drop_unsupported: bool = False,
               cfg: GradeConfig | None = None, cache_path: Path | None = None,
               responses_path: Path | None = None) -> dict:
    """Grade `input_path`; returns a summary {format, rows, items, metrics, grader stats}."""
    cfg = cfg or GradeConfig()
    records = read_records(input_path)
    prompts, report = convert(records, input_path, fmt, drop_unsupported)
    responses = read_responses(responses_path) if responses_path is not None else None
    inputs, index, missing = [], [], 0
    for i, ((where, rec), prompt) in enumerate(zip(records, prompts)):
        if prompt is None:
            continue
        if responses is not None:
            text = user_prompt(prompt["messages"])
            response = responses.get(text, responses.get(text.strip()))
            if response is None:  # the official evaluators score a missing response as all unmet
                missing, response = missing + 1, ""
        else:
            response = rec.get("response")
        if not isinstance(response, str):
            raise PromptFileError(f"{where}: field 'response': must be a string with the answer to grade "
                                  "(or give the responses in a second file with --responses)")
        inputs.append(GradeInput(prompt["rubric"], response, prompt["messages"]))
        index.append((i, prompt))
    from herl.grading.judge import check_judge

    check_judge(cfg, [inp.rubric for inp in inputs])  # a judge that cannot answer is found out first
    grader = RubricGrader(cfg, cache_path=cache_path)
    try:
        graded, scores, fallbacks = score_answers(grader, inputs, cfg)
    finally:
        grader.close()

    item_rows, row_rows = [], []
    for (i, prompt), verdicts, row in zip(index, graded, scores):
        for j, (item, v) in enumerate(zip(prompt["rubric"], verdicts)):
            item_rows.append({"input_row": i, "prompt_id": prompt["prompt_id"], "item_index": j,
                              "item_id": item["item_id"], "kind": item["kind"], "weight": item["weight"],
                              "verdict_strict": v.strict, "verdict_loose": v.loose_verdict,
                              "grader": v.grader, "detail": v.detail})
        row_rows.append({"input_row": i, "prompt_id": prompt["prompt_id"], **row})
    write_table("graded_items", item_rows, output)
    write_table("graded_rows", row_rows, rows_path(output))
    metrics = {**mean_rewards(row_rows), "unknown_items": sum(r["items_unknown"] for r in row_rows)}
    if report["format"] == "ifeval":
        metrics.update(ifeval_metrics(row_rows, item_rows))
    if cfg.reward == "implicit":
        metrics["implicit_fallbacks"] = fallbacks
    if responses is not None:
        metrics["missing_responses"] = missing
    # the reason of the first item no verdict could be had for (its column holds them all)
    unknown = next((r["detail"] for r in item_rows if r["verdict_strict"] == "unknown" and r["detail"]), None)
    return {**report, "graded_rows": len(row_rows), "graded_items": len(item_rows), "metrics": metrics,
            **grader.stats(), "output": str(output), "rows_output": str(rows_path(output)),
            "first_unknown_reason": unknown}
