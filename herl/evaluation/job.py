"""The `herl eval` job: test-time self-improvement on a prompts file (not a loop stage:
no run folder, no manifest; the loop itself is herl.evaluation.self_improve).

Round 0 answers every prompt once; each later round revises the answers that do not yet
meet every rubric item, with the same hindsight prompt training uses (the draft plus the
items met / not met), and grades the revisions. A fully met answer is kept as it is.
Scores mean what they mean in training (herl.grading.rubric): rewards follow grade.reward, and
the verdicts a revision is shown, and whether an answer is fully met, follow grade.mode.

Reads:  a prompts file in any supported format (herl.data.importers), a model folder
Writes: OUT/eval_answers.parquet  one row per (round, prompt)
        OUT/eval_metrics.parquet  one row per (round, metric): mean rewards, and IFEval's
                                  four accuracies when every rubric item is an IFEval instruction
The same loop evaluates held-out prompts inside a training run (stages/heldout.py).
Alone:  python -m herl.evaluation.job --prompts FILE --model DIR --rounds R --out DIR [--limit N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from herl.data.importers import PromptFileError, convert, read_records, source_path
from herl.evaluation.self_improve import self_improve
from herl.generation.engines import release_engines
from herl.models.paths import resolve_model_path
from schemas.config import HerlConfig, load_config
from schemas.tables import write_table


def load_inputs(prompts_path: Path, model: str, limit: int | None = None, fmt: str = "auto",
                drop_unsupported: bool = False) -> tuple[list[dict], Path]:
    """The prompts to evaluate (checked row by row) and the model's folder; raises a
    PromptFileError naming the file, row and field, or FileNotFoundError for the model.
    `builtin:ifeval` names IFEval's prompts, shipped with herl."""
    prompts_path = source_path(prompts_path)
    rows, _ = convert(read_records(prompts_path), prompts_path, fmt, drop_unsupported)
    prompts = [r for r in rows if r is not None][:limit]
    if not prompts:
        raise PromptFileError(f"{prompts_path}: no prompts to evaluate")
    return prompts, resolve_model_path(model)


def run(prompts_path: Path, model: str, out_dir: Path, rounds: int = 2, limit: int | None = None,
        cfg: HerlConfig | None = None, temperature: float | None = None, max_tokens: int | None = None,
        fmt: str = "auto", drop_unsupported: bool = False) -> dict:
    """Answer, grade, and revise for `rounds` rounds; returns {round: {metric: value}}.

    Sampling follows cfg.evaluation (temperature, default greedy; max_tokens, default
    rollout.max_tokens) unless `temperature` / `max_tokens` are given."""
    cfg = cfg or load_config(None)
    temperature = cfg.evaluation.temperature if temperature is None else temperature
    max_tokens = max_tokens or cfg.evaluation.max_tokens or cfg.rollout.max_tokens
    out_dir = Path(out_dir)
    prompts, model_path = load_inputs(Path(prompts_path), model, limit, fmt, drop_unsupported)
    try:
        answer_rows, metric_rows, summary = self_improve(
            prompts, model_path, cfg, rounds, temperature, max_tokens, out_dir / "judge_cache.sqlite",
            shared=out_dir)
    finally:
        release_engines()
    write_table("eval_answers", answer_rows, out_dir / "eval_answers.parquet")
    write_table("eval_metrics", metric_rows, out_dir / "eval_metrics.parquet")
    return summary


def metrics_markdown(summary: dict) -> str:
    names = sorted({k for m in summary.values() for k in m})
    lines = ["| round | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for rnd, m in sorted(summary.items()):
        lines.append(f"| {rnd} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in names) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m herl.evaluation.job", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, type=Path)
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    summary = run(args.prompts, args.model, args.out, args.rounds, args.limit)
    print(metrics_markdown(summary))
    print(json.dumps({"out": str(args.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
