"""Test-time self-improvement: answer, grade, and revise from the grader's verdicts for R rounds.

The loop behind `herl eval` (herl/evaluation/job.py) and the held-out evaluation inside a
training run (stages/heldout.py): the same prompts, grader and hindsight prompt as training.
"""

from __future__ import annotations

from pathlib import Path

from herl.data.hindsight_prompt import build_hindsight_prompt, encode_prompt
from herl.generation.engines import (
    GenRequest,
    SamplingParams,
    derive_seed,
    render_chat,
    shared_engine,
)
from herl.grading.ifbench import IFBENCH_IDS
from herl.grading.ifeval import IFEVAL_IDS
from herl.grading.rubric import (
    GradeInput,
    RubricGrader,
    ifeval_metrics,
    mean_rewards,
    score_answers,
    used_verdicts,
)
from schemas.config import HerlConfig


def self_improve(prompts: list[dict], model: Path, cfg: HerlConfig, rounds: int, temperature: float,
                 max_tokens: int, cache_path: Path | None, seed_tag: str = "eval",
                 shared: Path | None = None) -> tuple[list, list, dict]:
    """Answer `prompts` with `model`, grade, and revise for `rounds` rounds.

    Returns (answer rows, metric rows, {round: {metric: value}}): one answer row per
    (round, prompt) and one metric row per (round, metric). IFEval's four accuracies
    (prompt- and instruction-level, strict and loose; IFBench reports the same four) are
    added when every rubric item is an IFEval or IFBench instruction. `shared`: the folder
    engines on a Ray cluster must see (cluster.backend = ray)."""
    engine = shared_engine(cfg.rollout.engine, model, cfg.model.dtype, cfg.rollout.batch_size, cfg.vllm,
                           cfg.cluster, shared)
    grader = RubricGrader(cfg.grade, cache_path=cache_path)
    params = SamplingParams(temperature, cfg.rollout.top_p, cfg.rollout.top_k, max_tokens)
    mode = cfg.grade.mode  # the verdicts revisions are shown and stopping follows, as in training
    instruction_ids = set(IFEVAL_IDS) | set(IFBENCH_IDS)
    ifeval = all(it["kind"] in instruction_ids for p in prompts for it in p["rubric"])
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
                    h, verdicts = cfg.hindsight, graded[p["prompt_id"]]
                    prompt_ids.append(encode_prompt(engine.tokenizer, build_hindsight_prompt(
                        p["messages"], p["rubric"], used_verdicts(verdicts, mode), answers[p["prompt_id"]],
                        h.show_weights, wording=h.template, show_draft=h.show_draft, show_items=h.show_items,
                        details=[v.detail for v in verdicts] if h.show_details else None), h.chat_template)[1])
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
                m.update(ifeval_metrics(round_rows, [{"verdict_strict": v.strict, "verdict_loose": v.loose_verdict}
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
