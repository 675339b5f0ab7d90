"""Does showing a model its verdicts help it revise? Drafts, then follow-ups per failed draft.

    python benchmarks/hindsight_effect.py [--model builtin:smollm2-135m-instruct | DIR] [--prompts builtin:ifeval | FILE]
        [--n 30] [--drafts 2] [--max-tokens 128] [--temperature 0.3] [--arms herl,goals,...]
        [--engine auto] [--out benchmarks/results/hindsight_effect]
    python benchmarks/hindsight_effect.py --pool DIR [DIR ...]   # several --seed measurements of one policy

On N prompts of an IFEval-format file (a seeded subset) the model (a built-in name or
any model folder) drafts G answers at temperature 1.0; every draft that misses an item
gets one follow-up per arm, sampled at --temperature (hindsight.temperature's default),
and all are graded with the strict checks. Each arm is one setting of what the hindsight
prompt shows (hindsight.template, show_draft, show_items, show_details, chat_template):

  herl            herl's wording: verdict sections, every item, the draft (the default)
  herl_unmet      herl's wording, only the items to fix
  herl_details    herl's wording with the grader's detail beside each item
  herl_no_draft   herl's wording without the draft, with details
  naive           the rubric without verdicts, plus the draft (NaiveHE)
  reference       the authors' wording, rendered as raw text as their code does
  reference_chat  the authors' wording as a user turn under the chat template
  goals           the request with the missed items as requirements, no draft
  goals_details   goals with the grader's detail
  control         a fresh sample of the original prompt (no feedback at all)

Reported per arm: mean reward, the paired difference to `control` over the same failed
drafts with its standard error, items met, follow-ups meeting every item or beating their
group's best draft (what HeRL needs to mix anything in), truncation (hit the token limit)
and template echo (the follow-up repeats the prompt's scaffolding: "## Task",
"Satisfied:", "[Candidate]", ...) rates, and the mean prompt length in tokens. Writes
results.md and followups.parquet under --out and prints the table. It reports what it
measured.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
# arm -> (template, show_draft, show_items, show_details, chat_template, naive); None: control
ARMS: dict[str, tuple | None] = {
    "herl": ("herl", True, "all", False, True, False),
    "herl_unmet": ("herl", True, "unmet", False, True, False),
    "herl_details": ("herl", True, "all", True, True, False),
    "herl_no_draft": ("herl", False, "all", True, True, False),
    "naive": ("herl", True, "all", False, True, True),
    "reference": ("reference", True, "all", False, False, False),
    "reference_chat": ("reference", True, "all", False, True, False),
    "goals": ("goals", False, "all", False, True, False),
    "goals_details": ("goals", False, "all", True, True, False),
    "control": None,
}
# the hindsight prompts' own scaffolding: a follow-up that repeats it echoes the template
ECHO_MARKERS = ("## Task", "## Draft", "## Rubric", "## Instruction", "Satisfied:", "Not satisfied:",
                "Revise the draft", "[Candidate]", "[Instruction]", "Unmet:", "Draft:", "revise assistant",
                "Make sure your answer follows these requirements", "Mistakes the draft")


def followup_ids(arm: str, tokenizer, prompt: dict, verdicts: list[str], details: list[str], draft: str) -> list[int]:
    from herl.data.hindsight_prompt import build_hindsight_prompt, encode_prompt
    from herl.generation.engines import render_chat

    setting = ARMS[arm]
    if setting is None:
        return render_chat(tokenizer, prompt["messages"])[1]
    wording, show_draft, show_items, show_details, chat, naive = setting
    text = build_hindsight_prompt(prompt["messages"], prompt["rubric"], verdicts, draft, naive=naive, wording=wording,
                                  show_draft=show_draft, show_items=show_items,
                                  details=details if show_details else None)
    return encode_prompt(tokenizer, text, chat_template=chat)[1]


def echoes(text: str) -> bool:
    return any(m in text for m in ECHO_MARKERS)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def pooled(folders: list[Path], baselines: tuple[str, ...] = ("control", "herl")) -> str:
    """Paired differences pooled over several measurements of one policy (say two --seed
    values): every arm against each baseline it was measured beside, over the failed
    drafts of all folders (one pair per draft), with its standard error."""
    import pyarrow.parquet as pq

    per_draft: list[dict[str, float]] = []  # one {arm: follow-up reward} per failed draft
    for folder in folders:
        drafts: dict[tuple, dict[str, float]] = {}
        for r in pq.read_table(Path(folder) / "followups.parquet").to_pylist():
            drafts.setdefault((r["prompt_id"], r["draft_index"]), {})[r["arm"]] = r["reward"]
        per_draft += drafts.values()
    arms = sorted({a for d in per_draft for a in d}, key=lambda a: list(ARMS).index(a) if a in ARMS else len(ARMS))
    lines = [f"Pooled over {len(folders)} measurement(s), {len(per_draft)} failed drafts: paired difference, "
             "± one standard error (drafts)", "", "| arm | " + " | ".join(f"vs {b}" for b in baselines) + " |",
             "|---|" + "---|" * len(baselines)]
    for arm in arms:
        cells = []
        for b in baselines:
            diffs = [d[arm] - d[b] for d in per_draft if arm in d and b in d]
            if arm == b or not diffs:
                cells.append("—")
            else:
                m, se = mean_se(diffs)
                cells.append(f"{m:+.3f} ± {se:.3f} (n {len(diffs)})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", nargs="+", type=Path, metavar="DIR",
                    help="measure nothing: pool the followups.parquet of these --out folders (one policy, "
                         "several seeds) and print the paired differences")
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--prompts", default="builtin:ifeval")
    ap.add_argument("--n", type=int, default=30, help="prompts (a seeded subset)")
    ap.add_argument("--drafts", type=int, default=2, help="drafts per prompt (G)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--engine", default="auto", choices=["auto", "transformers", "vllm"])
    ap.add_argument("--temperature", type=float, default=0.3, help="follow-ups' sampling temperature")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated, from: " + ", ".join(ARMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hindsight_effect"))
    args = ap.parse_args()
    if args.pool:
        print(pooled(args.pool))
        return 0
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if "control" not in arms:
        arms.append("control")  # the paired differences are to it

    import pyarrow as pa
    import pyarrow.parquet as pq

    from herl.data.pool import evaluation_prompts
    from herl.generation.engines import (
        GenRequest,
        SamplingParams,
        derive_seed,
        load_engine,
        render_chat,
    )
    from herl.grading.rubric import GradeInput, RubricGrader, score_answers
    from herl.models.paths import resolve_model_path
    from schemas.config import VLLMConfig, load_config

    cfg = load_config(None, {"evaluation.source": args.prompts, "evaluation.limit": args.n, "seed": args.seed,
                             "evaluation.every": 1, "grade.reward": "fraction"})
    prompts = evaluation_prompts(cfg)
    model = resolve_model_path(args.model)
    vcfg = VLLMConfig(enforce_eager=True, cpu_kvcache_gib=2, max_model_len=4096)
    t0 = time.perf_counter()
    engine = load_engine(args.engine, model, "float32", 64, vcfg)
    grader = RubricGrader(cfg.grade)

    def grade(pairs):  # [(prompt, text)] -> (verdicts, details, scores)
        v, rows, _ = score_answers(grader, [GradeInput(p["rubric"], t, p["messages"]) for p, t in pairs], cfg.grade)
        return [[x.strict for x in vs] for vs in v], [[x.detail for x in vs] for vs in v], rows

    reqs = [GenRequest(p["prompt_id"], render_chat(engine.tokenizer, p["messages"])[1],
                       derive_seed(args.seed, "draft", p["prompt_id"]), args.drafts) for p in prompts]
    drafts = engine.generate(reqs, SamplingParams(1.0, 1.0, 0, args.max_tokens))
    flat = [(p, c.text) for p, outs in zip(prompts, drafts) for c in outs]
    draft_truncated = [c.finish_reason == "length" for outs in drafts for c in outs]
    d_verdicts, d_details, d_scores = grade(flat)
    best = {}
    for (p, _), s in zip(flat, d_scores):
        best[p["prompt_id"]] = max(best.get(p["prompt_id"], 0.0), s["reward_strict"])
    failed = [(i, p, text) for i, ((p, text), s) in enumerate(zip(flat, d_scores)) if not s["all_met_strict"]]
    t_draft = time.perf_counter() - t0

    followups = []
    for i, p, text in failed:
        for arm in arms:
            ids = followup_ids(arm, engine.tokenizer, p, d_verdicts[i], d_details[i], text)
            followups.append((arm, i, p, GenRequest(f"{arm}:{i}", ids, derive_seed(args.seed, arm, i), 1)))
    outs = engine.generate([f[3] for f in followups], SamplingParams(args.temperature, 1.0, 0, args.max_tokens))
    _, _, f_scores = grade([(f[2], o[0].text) for f, o in zip(followups, outs)])
    engine.close()
    wall = time.perf_counter() - t0

    rows = []
    for (arm, i, p, req), out, s in zip(followups, outs, f_scores):
        rows.append({"arm": arm, "draft_index": i, "prompt_id": p["prompt_id"], "prompt_tokens": len(req.prompt_token_ids),
                     "draft_reward": d_scores[i]["reward_strict"], "draft_items_met": d_scores[i]["items_met_strict"],
                     "reward": s["reward_strict"], "items_met": s["items_met_strict"], "items_total": s["items_total"],
                     "all_met": s["all_met_strict"], "beats_group_best": s["reward_strict"] > best[p["prompt_id"]],
                     "truncated": out[0].finish_reason == "length", "echo": echoes(out[0].text),
                     "text": out[0].text})
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out_dir / "followups.parquet")

    control = {x["draft_index"]: x["reward"] for x in rows if x["arm"] == "control"}
    n_drafts = len(flat)
    lines = [f"# Hindsight effect: {args.model}", "",
             f"{len(prompts)} prompts of {Path(args.prompts).name} x {args.drafts} drafts at T 1.0, {args.max_tokens} "
             f"tokens, engine {type(engine).__name__}; follow-ups at T {args.temperature:g}. Drafts: mean reward "
             f"{sum(s['reward_strict'] for s in d_scores) / n_drafts:.3f}, {n_drafts - len(failed)} of {n_drafts} "
             f"fully met, {sum(draft_truncated) / max(1, n_drafts):.0%} truncated. On the {len(failed)} failed drafts "
             f"(mean reward {sum(d_scores[i]['reward_strict'] for i, _, _ in failed) / max(1, len(failed)):.3f}):", "",
             "| arm | mean reward | vs control (paired, ± s.e.) | items met | fully met | beats group best | "
             "truncated | template echo | prompt tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        r = [x for x in rows if x["arm"] == arm]
        n = max(1, len(r))
        diff, se = mean_se([x["reward"] - control[x["draft_index"]] for x in r])
        lines.append(f"| {arm} | {sum(x['reward'] for x in r) / n:.3f} | "
                     f"{'—' if arm == 'control' else f'{diff:+.3f} ± {se:.3f}'} | "
                     f"{sum(x['items_met'] for x in r)}/{sum(x['items_total'] for x in r)} | "
                     f"{sum(x['all_met'] for x in r)} | {sum(x['beats_group_best'] for x in r)} | "
                     f"{sum(x['truncated'] for x in r) / n:.0%} | {sum(x['echo'] for x in r) / n:.0%} | "
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
