"""Evaluate stage: test-time self-improvement driven by the grader's verdicts.

Round 0 answers every prompt once; each later round revises the answers that do not yet
meet every rubric item, with the same hindsight prompt training uses (the draft plus the
items met / not met), and grades the revisions. A fully met answer is kept as it is.
Scores mean what they mean in training (herl.scoring): rewards follow grade.reward, and
the verdicts a revision is shown, and whether an answer is fully met, follow grade.mode.

Reads:  a prompts file in any supported format (herl.importers), a model folder
Writes: OUT/eval_answers.parquet  one row per (round, prompt)
        OUT/eval_metrics.parquet  one row per (round, metric): mean rewards, and IFEval's
                                  four accuracies when every rubric item is an IFEval instruction
The same loop evaluates held-out prompts inside a training run (stages.heldout).
Alone:  python -m stages.evaluate --prompts FILE --model DIR --rounds R --out DIR [--limit N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from herl.engines import GenRequest, SamplingParams, derive_seed, release_engines, render_chat, shared_engine
from herl.hindsight_prompt import build_hindsight_prompt, encode_prompt
from herl.grading import GradeInput, RubricGrader
from herl.ifeval import IFEVAL_IDS
from herl.importers import convert, read_records
from herl.scoring import ifeval_metrics, mean_rewards, score_answers, used_verdicts
from herl.tiny import resolve_model_path
from schemas.config import HerlConfig, load_config
from schemas.tables import write_table


def self_improve(prompts: list[dict], model: Path, cfg: HerlConfig, rounds: int, temperature: float,
                 max_tokens: int, cache_path: Path | None, seed_tag: str = "eval") -> tuple[list, list, dict]:
    """Answer `prompts` with `model`, grade, and revise for `rounds` rounds.

    Returns (answer rows, metric rows, {round: {metric: value}}): one answer row per
    (round, prompt) and one metric row per (round, metric). IFEval's four accuracies are
    added when every rubric item is an IFEval instruction."""
    engine = shared_engine(cfg.rollout.engine, model, cfg.model.dtype, cfg.rollout.batch_size, cfg.vllm)
    grader = RubricGrader(cfg.grade, cache_path=cache_path)
    params = SamplingParams(temperature, cfg.rollout.top_p, cfg.rollout.top_k, max_tokens)
    mode = cfg.grade.mode  # the verdicts revisions are shown and stopping follows, as in training
    ifeval = all(it["kind"] in IFEVAL_IDS for p in prompts for it in p["rubric"])
    answers: dict[str, str] = {}
    graded: dict[str, list] = {}
    scores: dict[str, dict] = {}
    answer_rows, metric_rows, summary = [], [], {}
    try:
        todo = prompts
        for rnd in range(rounds + 1):
            prompt_ids = []  # (n,) token ids of each prompt this round
            for p in todo:
                if rnd == 0:
                    prompt_ids.append(render_chat(engine.tokenizer, p["messages"])[1])
                else:  # revise with the verdicts the grader gave the current answer
                    prompt_ids.append(encode_prompt(engine.tokenizer, build_hindsight_prompt(
                        p["messages"], p["rubric"], used_verdicts(graded[p["prompt_id"]], mode),
                        answers[p["prompt_id"]], cfg.hindsight.show_weights, wording=cfg.hindsight.template),
                        cfg.hindsight.chat_template)[1])
            reqs = [GenRequest(p["prompt_id"], ids, derive_seed(cfg.seed, seed_tag, rnd, p["prompt_id"]), 1)
                    for p, ids in zip(todo, prompt_ids)]
            for p, out in zip(todo, engine.generate(reqs, params)):
                answers[p["prompt_id"]] = out[0].text
            verdicts, rows, fallbacks = score_answers(
                grader, [GradeInput(p["rubric"], answers[p["prompt_id"]], p["messages"]) for p in todo], cfg.grade)
            for p, vs, row in zip(todo, verdicts, rows):
                graded[p["prompt_id"]], scores[p["prompt_id"]] = vs, row
            revised = {p["prompt_id"] for p in todo}
            round_rows = [{"round": rnd, "prompt_id": p["prompt_id"], "answer_text": answers[p["prompt_id"]],
                           "revised": rnd > 0 and p["prompt_id"] in revised, **scores[p["prompt_id"]]}
                          for p in prompts]
            m = {**mean_rewards(round_rows), "revised": float(len(revised) if rnd else 0)}
            if cfg.grade.reward == "implicit":
                m["implicit_fallbacks"] = float(fallbacks)
            if ifeval:
                m.update(ifeval_metrics(round_rows, [{"verdict_strict": v.verdict, "verdict_loose": v.loose_verdict}
                                                     for p in prompts for v in graded[p["prompt_id"]]]))
            summary[rnd] = m
            answer_rows += round_rows
            metric_rows += [{"round": rnd, "name": k, "value": float(v)} for k, v in sorted(m.items())]
            todo = [p for p in prompts if not scores[p["prompt_id"]][f"all_met_{mode}"]]
            if not todo:  # everything met: later rounds would change nothing, but are still reported
                for later in range(rnd + 1, rounds + 1):
                    summary[later] = dict(m, revised=0.0)
                    metric_rows += [{"round": later, "name": k, "value": float(v)}
                                    for k, v in sorted(summary[later].items())]
                    answer_rows += [dict(r, round=later, revised=False) for r in round_rows]
                break
    finally:
        grader.close()
    return answer_rows, metric_rows, summary


def run(prompts_path: Path, model: str, out_dir: Path, rounds: int = 2, limit: int | None = None,
        cfg: HerlConfig | None = None, temperature: float | None = None, max_tokens: int | None = None,
        fmt: str = "auto", drop_unsupported: bool = False) -> dict:
    """Answer, grade, and revise for `rounds` rounds; returns {round: {metric: value}}.

    Sampling follows cfg.evaluation (temperature, default greedy; max_tokens, default
    rollout.max_tokens) unless `temperature` / `max_tokens` are given."""
    cfg = cfg or load_config(None)
    temperature = cfg.evaluation.temperature if temperature is None else temperature
    max_tokens = max_tokens or cfg.evaluation.max_tokens or cfg.rollout.max_tokens
    prompts_path, out_dir = Path(prompts_path), Path(out_dir)
    rows, _ = convert(read_records(prompts_path), prompts_path, fmt, drop_unsupported)
    prompts = [r for r in rows if r is not None][:limit]
    if not prompts:
        raise ValueError(f"{prompts_path}: no prompts to evaluate")
    try:
        answer_rows, metric_rows, summary = self_improve(
            prompts, resolve_model_path(model), cfg, rounds, temperature, max_tokens, out_dir / "judge_cache.sqlite")
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
    ap = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.split("\n\n")[0])
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
