"""Does showing a model its verdicts help it revise? Drafts, then follow-ups per failed draft.

    python benchmarks/hindsight_effect.py [--model builtin:smollm2-135m-instruct] [--prompts FILE]
        [--n 30] [--drafts 2] [--max-tokens 128] [--engine auto] [--out benchmarks/results/hindsight_effect]

On N IFEval prompts (a seeded subset) the model drafts G answers at the rollout
temperature (1.0); every draft that misses an item gets one follow-up per arm, all
sampled at the revision temperature (0.3), and all are graded with IFEval's strict checks:

  herl           herl's hindsight prompt (verdict sections, draft), chat template
  naive          the rubric without verdicts, plus the draft (NaiveHE), chat template
  reference      the authors' wording, rendered as raw text as their code does
  reference_chat the authors' wording as a user turn under the chat template
  unmet_only     the original request plus the unmet items, no draft (a probe: does the draft hurt?)
  control        a fresh sample of the original prompt (no feedback at all)

Reported per arm: mean reward and items met before (the failed drafts) and after, how
many follow-ups meet every item, how many beat their group's best draft (what HeRL needs
to mix anything in), and the mean prompt length in tokens. Writes results.md and
followups.parquet under --out, and prints the table. It reports what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
ARMS = ["herl", "naive", "reference", "reference_chat", "unmet_only", "control"]


def followup_ids(arm: str, tokenizer, prompt: dict, verdicts: list[str], draft: str) -> list[int]:
    from herl.engines import render_chat
    from herl.hindsight_prompt import build_hindsight_prompt, encode_prompt

    msgs, rubric = prompt["messages"], prompt["rubric"]
    if arm == "control":
        return render_chat(tokenizer, msgs)[1]
    if arm == "unmet_only":
        unmet = [it["description"] for it, v in zip(rubric, verdicts) if v != "met"]
        text = msgs[-1]["content"] + "\n\nMake sure your answer follows these requirements:\n" + \
            "\n".join(f"- {u}" for u in unmet)
        return render_chat(tokenizer, [*msgs[:-1], {"role": msgs[-1]["role"], "content": text}])[1]
    wording = "reference" if arm.startswith("reference") else "herl"
    text = build_hindsight_prompt(msgs, rubric, verdicts, draft, naive=arm == "naive", wording=wording)
    return encode_prompt(tokenizer, text, chat_template=arm != "reference")[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--prompts", default=str(ROOT.parent / "shared" / "benchmarks" / "ifeval_input_data.jsonl"))
    ap.add_argument("--n", type=int, default=30, help="prompts (a seeded subset)")
    ap.add_argument("--drafts", type=int, default=2, help="drafts per prompt (G)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--engine", default="auto", choices=["auto", "transformers", "vllm"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hindsight_effect"))
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from herl.engines import GenRequest, SamplingParams, derive_seed, load_engine, render_chat
    from herl.rubric import GradeInput, RubricGrader, score_answers
    from herl.task import evaluation_prompts
    from herl.tiny import resolve_model_path
    from schemas.config import VLLMConfig, load_config

    cfg = load_config(None, {"evaluation.source": args.prompts, "evaluation.limit": args.n, "seed": args.seed,
                             "evaluation.every": 1, "grade.reward": "fraction"})
    prompts = evaluation_prompts(cfg)
    model = resolve_model_path(args.model)
    vcfg = VLLMConfig(enforce_eager=True, cpu_kvcache_gib=2, max_model_len=4096)
    t0 = time.perf_counter()
    engine = load_engine(args.engine, model, "float32", 64, vcfg)
    grader = RubricGrader(cfg.grade)

    def grade(pairs):  # [(prompt, text)] -> (verdicts, scores)
        v, rows, _ = score_answers(grader, [GradeInput(p["rubric"], t, p["messages"]) for p, t in pairs], cfg.grade)
        return [[x.strict for x in vs] for vs in v], rows

    reqs = [GenRequest(p["prompt_id"], render_chat(engine.tokenizer, p["messages"])[1],
                       derive_seed(args.seed, "draft", p["prompt_id"]), args.drafts) for p in prompts]
    drafts = engine.generate(reqs, SamplingParams(1.0, 1.0, 0, args.max_tokens))
    flat = [(p, c.text) for p, outs in zip(prompts, drafts) for c in outs]
    d_verdicts, d_scores = grade(flat)
    best = {}
    for (p, _), s in zip(flat, d_scores):
        best[p["prompt_id"]] = max(best.get(p["prompt_id"], 0.0), s["reward_strict"])
    failed = [(i, p, text) for i, ((p, text), s) in enumerate(zip(flat, d_scores)) if not s["all_met_strict"]]
    t_draft = time.perf_counter() - t0

    followups = []
    for i, p, text in failed:
        for arm in ARMS:
            ids = followup_ids(arm, engine.tokenizer, p, d_verdicts[i], text)
            followups.append((arm, i, p, GenRequest(f"{arm}:{i}", ids, derive_seed(args.seed, arm, i), 1)))
    outs = engine.generate([f[3] for f in followups], SamplingParams(0.3, 1.0, 0, args.max_tokens))
    f_verdicts, f_scores = grade([(f[2], o[0].text) for f, o in zip(followups, outs)])
    engine.close()
    wall = time.perf_counter() - t0

    rows = []
    for (arm, i, p, req), out, s in zip(followups, outs, f_scores):
        rows.append({"arm": arm, "draft_index": i, "prompt_id": p["prompt_id"], "prompt_tokens": len(req.prompt_token_ids),
                     "draft_reward": d_scores[i]["reward_strict"], "draft_items_met": d_scores[i]["items_met_strict"],
                     "reward": s["reward_strict"], "items_met": s["items_met_strict"], "items_total": s["items_total"],
                     "all_met": s["all_met_strict"], "beats_group_best": s["reward_strict"] > best[p["prompt_id"]],
                     "text": out[0].text})
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out_dir / "followups.parquet")

    n_drafts = len(flat)
    lines = [f"# Hindsight effect: {args.model}", "",
             f"{len(prompts)} IFEval prompts x {args.drafts} drafts at T 1.0, {args.max_tokens} tokens, engine "
             f"{type(engine).__name__}; follow-ups at T 0.3. Drafts: mean reward "
             f"{sum(s['reward_strict'] for s in d_scores) / n_drafts:.3f}, {n_drafts - len(failed)} of {n_drafts} "
             f"fully met. On the {len(failed)} failed drafts (mean reward "
             f"{sum(d_scores[i]['reward_strict'] for i, _, _ in failed) / max(1, len(failed)):.3f}):", "",
             "| arm | mean reward | items met | fully met | beats group best | prompt tokens |",
             "|---|---|---|---|---|---|"]
    for arm in ARMS:
        r = [x for x in rows if x["arm"] == arm]
        n = max(1, len(r))
        lines.append(f"| {arm} | {sum(x['reward'] for x in r) / n:.3f} | "
                     f"{sum(x['items_met'] for x in r)}/{sum(x['items_total'] for x in r)} | "
                     f"{sum(x['all_met'] for x in r)} | {sum(x['beats_group_best'] for x in r)} | "
                     f"{sum(x['prompt_tokens'] for x in r) / n:.0f} |")
    lines += ["", f"draft items met: {sum(d_scores[i]['items_met_strict'] for i, _, _ in failed)}/"
              f"{sum(d_scores[i]['items_total'] for i, _, _ in failed)}; drafts took {t_draft:.0f} s, "
              f"everything {wall:.0f} s on this machine."]
    text = "\n".join(lines) + "\n"
    (out_dir / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
