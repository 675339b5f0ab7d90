"""Rubric grading: verdicts for (answer, rubric item) pairs, and the scores made of them.

A rubric item is {item_id, description, weight, kind, params}. `kind` names a check in
the registry (or `judge`, graded by an LLM judge, see herl.grading.judge); `params` (a JSON
object) are its keyword arguments. Add a check with

    @register_check("my_kind", describe=lambda limit: f"Use at most {limit} lines.")
    def my_kind(response: str, *, limit: int) -> bool: ...

A check returns a bool (met / unmet) or (bool, detail); `describe` makes the item's
description from its params when the data has none (IFEval's has none). A check that
raises gives the verdict `unknown` with the error as detail; never a silent 0/1.

Every verifiable item gets a strict and a loose verdict. Loose is IFEval's: the item is
met if the check passes on the response or on any of its variants with the first line,
the last line or both removed, each also with markdown asterisks stripped.

## Scores

Per-answer scores from rubric verdicts: one definition for the grade stage (training
rewards), `herl grade` and `herl eval` / the held-out evaluation, so that a score means
the same thing wherever it is reported.

An answer's scores are its reward under its strict and under its loose verdicts
(aggregated as `grade.reward` says; `implicit` takes the judge's holistic score, with the
weighted item reward standing in where none could be had), the items met under each, the
unknown items, and whether every item was met.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# the built-in, IFEval and IFBench checks register themselves as kinds (on herl.grading.checks)
from herl.grading import general_checks as _general_kinds  # noqa: F401
from herl.grading import ifbench as _ifbench_kinds  # noqa: F401
from herl.grading import ifeval as _ifeval_kinds  # noqa: F401

# the registry and verdicts live in a leaf module; re-exported here for plugins and callers
from herl.grading.checks import (  # noqa: F401
    CHECKS,
    JUDGE_KIND,
    MET,
    UNKNOWN,
    UNMET,
    Check,
    Verdict,
    check_params,
    describe_item,
    is_known_kind,
    register_check,
)
from schemas.config import GradeConfig


def loose_variants(response: str) -> list[str]:
    """IFEval's loose variants: first / last / both lines removed, asterisks stripped."""
    lines = response.split("\n")
    first = "\n".join(lines[1:]).strip()
    last = "\n".join(lines[:-1]).strip()
    both = "\n".join(lines[1:-1]).strip()
    return [response, response.replace("*", ""), first, last, both,
            first.replace("*", ""), last.replace("*", ""), both.replace("*", "")]


class VerifiableGrader:
    """Grades items whose `kind` is a registered check (judge items come back unknown)."""

    name = "verifiable"

    def _run(self, check: Check, params: dict, response: str, prompt: str) -> tuple[bool, str]:
        res = check.fn(response, **params, **({"prompt": prompt} if check.needs_prompt else {}))
        return res if isinstance(res, tuple) else (res, "")

    def grade(self, rubric: list[dict], response: str, prompt: str = "") -> list[Verdict]:
        out = []
        for item in rubric:
            check = CHECKS.get(item["kind"])
            if check is None:
                out.append(Verdict(UNKNOWN, self.name, f"no check registered for kind {item['kind']!r}"))
                continue
            try:
                params = json.loads(item["params"]) if item["params"] else {}
                # IFEval grades an empty response as not following any instruction
                ok, detail = self._run(check, params, response, prompt) if response.strip() else (False, "empty response")
                loose_ok = ok or any(v.strip() and self._run(check, params, v, prompt)[0]
                                     for v in loose_variants(response)[1:])
            except Exception as exc:  # a broken check must surface as unknown, not as a verdict
                out.append(Verdict(UNKNOWN, self.name, f"{type(exc).__name__}: {exc}"))
                continue
            strict = MET if ok else UNMET
            loose = MET if loose_ok else UNMET
            out.append(Verdict(strict, self.name, detail, None if loose == strict else loose))
        return out


def user_prompt(messages: list[dict]) -> str:
    """The last user message of a conversation: what checks that need the prompt see."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


@dataclass(frozen=True)
class GradeInput:
    rubric: list[dict]
    response: str
    messages: list[dict]

    @property
    def prompt(self) -> str:
        return user_prompt(self.messages)


class RubricGrader:
    """Verifiable items by their checks; `judge` items by an LLM judge, made on first need.

    `grade_cfg` is schemas.config.GradeConfig; `cache_path` is where the judge cache lives."""

    def __init__(self, grade_cfg, cache_path=None):
        self.cfg, self.cache_path = grade_cfg, cache_path
        self.verifiable = VerifiableGrader()
        self.judge = None

    def grade_many(self, inputs: list[GradeInput]) -> list[list[Verdict]]:
        from herl.grading.judge import JudgeTask, conversation_text, make_judge
        from herl.util.progress import Progress

        results, tasks, slots = [], [], []
        progress = Progress("grade", len(inputs), "answers")
        for i, inp in enumerate(inputs):
            results.append(self.verifiable.grade(inp.rubric, inp.response, inp.prompt))
            progress.update(1)
            idx = [j for j, it in enumerate(inp.rubric) if it["kind"] == JUDGE_KIND]
            if idx:
                tasks.append(JudgeTask(conversation_text(inp.messages), inp.response,
                                       tuple(inp.rubric[j]["description"] for j in idx),
                                       tuple(float(inp.rubric[j]["weight"]) for j in idx),
                                       question="\n".join(m["content"] for m in inp.messages if m["role"] == "user")))
                slots.append((i, idx))
        progress.close()
        if tasks:
            if self.judge is None:
                self.judge = make_judge(self.cfg.judge, self.cache_path)
            for (i, idx), verdicts in zip(slots, self.judge.grade_many(tasks)):
                for j, v in zip(idx, verdicts):
                    results[i][j] = v
        return results

    def score_many(self, inputs: list[GradeInput]) -> list[tuple[float | None, str]]:
        """RaR's implicit reward: a holistic judge score in [0, 1] per input (None where none could be had)."""
        from herl.grading.judge import JudgeTask, conversation_text, make_judge

        if self.judge is None:
            self.judge = make_judge(self.cfg.judge, self.cache_path)
        return self.judge.score_many([JudgeTask(conversation_text(inp.messages), inp.response,
                                                tuple(it["description"] for it in inp.rubric),
                                                tuple(float(it["weight"]) for it in inp.rubric)) for inp in inputs])

    def stats(self) -> dict[str, float]:
        if self.judge is None:
            return {}
        st = self.judge.stats
        return {"judge_calls": st.calls, "judge_cache_hits": st.cache_hits, "judge_retries": st.retries,
                "judge_failures": st.failures}

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()


def aggregate(verdicts: Iterable[str], weights: Iterable[float], mode: str = "weighted",
              unknown_policy: str = "unmet", pitfalls: str = "subtract") -> tuple[float, int, int, int]:
    """Reward in [0, 1] from verdicts (docs/algorithm.md, step 2). Returns (reward, met, total, unknown).

    weighted: sum(w * met) / sum(w for w > 0), clipped to [0, 1]; negative weights are
    pitfalls that cost points when met (`pitfalls = subtract`, HealthBench's scoring) or
    count for nothing (`ignore`, the reference's code); fraction: met / total; all: 1 if
    every item met. unknown_policy: `unmet` counts unknown as unmet; `drop` removes it.
    """
    weights = [max(0.0, w) for w in weights] if pitfalls == "ignore" else list(weights)
    pairs = list(zip(verdicts, weights, strict=True))
    n_unknown = sum(v == UNKNOWN for v, _ in pairs)
    n_met = sum(v == MET for v, _ in pairs)
    if unknown_policy == "drop":
        pairs = [(v, w) for v, w in pairs if v != UNKNOWN]
    if not pairs:
        return 0.0, n_met, 0, n_unknown
    met = [v == MET for v, _ in pairs]
    if mode == "weighted":
        denom = sum(w for _, w in pairs if w > 0)
        num = sum(w for (_, w), m in zip(pairs, met) if m)
        reward = min(1.0, max(0.0, num / denom)) if denom > 0 else 0.0
    elif mode == "fraction":
        reward = sum(met) / len(met)
    elif mode == "all":
        reward = float(all(met))
    else:
        raise ValueError(f"unknown reward mode {mode!r}: use weighted, fraction or all (implicit is scored by a judge)")
    return reward, n_met, len(pairs), n_unknown


# ---- scores ---------------------------------------------------------------------




def used_verdicts(verdicts: list[Verdict], mode: str) -> list[str]:
    """The verdicts rewards and hindsight prompts use: strict, or IFEval's loose (grade.mode)."""
    return [v.loose_verdict if mode == "loose" else v.strict for v in verdicts]


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


# The reference's repetition rule (sikelifei/HeRL verl/utils/reward_score/if_score/__init__.py,
# contain_repeated_text): an answer loops when its last 160 characters occur 3 or more times
# in it. Its reward stands; HeRL's choices (candidates, the group's best, fallback copies)
# count it as 0 (hindsight.skip_looping).
LOOP_TAIL_CHARS = 160
LOOP_REPEATS = 3


def is_looping(text: str) -> bool:
    """Whether `text` loops by the reference's rule: its last LOOP_TAIL_CHARS characters
    occur LOOP_REPEATS or more times, counted without overlap as the reference's
    `len(text.split(tail)) > 3` counts them. An empty text does not loop (the reference's
    split raises on it, and its bare except scores the answer 0 on every item)."""
    if not text:
        return False
    return text.count(text[-LOOP_TAIL_CHARS:]) >= LOOP_REPEATS


def grade_samples(run_id: str, judge_cache: Path, k: int, prompts: dict[str, dict], samples: list[tuple[str, str, str]],
                  cfg: GradeConfig) -> tuple[list[dict], dict[str, dict], dict[str, float]]:
    """Grade (sample_id, prompt_id, response) triples against their prompt's rubric.

    `judge_cache` is the run's judge cache file (judge_cache.sqlite). Returns verdict rows
    (verdicts schema), {sample_id: {reward, items_met, items_scored,
    items_unknown, looped}} and grader statistics. Shared by the grade and hindsight stages so
    that answers and revisions are scored by the same grader.
    """
    grader = RubricGrader(cfg, cache_path=judge_cache)
    inputs = [GradeInput(prompts[pid]["rubric"], response, prompts[pid]["messages"]) for _, pid, response in samples]
    try:
        graded, rows, fallbacks = score_answers(grader, inputs, cfg)
    finally:
        grader.close()
    verdict_rows, scores = [], {}
    for (sample_id, prompt_id, response), verdicts, row in zip(samples, graded, rows):
        rubric = prompts[prompt_id]["rubric"]
        for j, (item, v, u) in enumerate(zip(rubric, verdicts, used_verdicts(verdicts, cfg.mode))):
            verdict_rows.append({
                "run_id": run_id, "iteration": k, "sample_id": sample_id, "prompt_id": prompt_id,
                "item_index": j, "item_id": item["item_id"], "verdict": u, "verdict_strict": v.strict,
                "verdict_loose": v.loose_verdict, "weight": item["weight"], "grader": v.grader, "detail": v.detail,
            })
        # items_scored counts the items the reward is over: unknown ones leave it under unknown_policy = drop
        dropped = row["items_unknown"] if cfg.unknown_policy == "drop" else 0
        scores[sample_id] = {"reward": row[f"reward_{cfg.mode}"], "items_met": row[f"items_met_{cfg.mode}"],
                             "items_scored": row["items_total"] - dropped, "items_unknown": row["items_unknown"],
                             "looped": is_looping(response)}
    stats = grader.stats()
    if cfg.reward == "implicit":
        stats["implicit_fallbacks"] = fallbacks
    return verdict_rows, scores, stats
