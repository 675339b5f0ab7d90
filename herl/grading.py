"""Rubric grading: the check registry, verifiable and judge graders, reward aggregation.

A rubric item is {item_id, description, weight, kind, params}. `kind` names a check in
the registry (or `judge`, graded by an LLM judge, see herl.judge); `params` (a JSON
object) are its keyword arguments. Add a check with

    @register_check("my_kind", describe=lambda limit: f"Use at most {limit} lines.")
    def my_kind(response: str, *, limit: int) -> bool: ...

A check returns a bool (met / unmet) or (bool, detail); `describe` makes the item's
description from its params when the data has none (IFEval's has none). A check that
raises gives the verdict `unknown` with the error as detail; never a silent 0/1.

Every verifiable item gets a strict and a loose verdict. Loose is IFEval's: the item is
met if the check passes on the response or on any of its variants with the first line,
the last line or both removed, each also with markdown asterisks stripped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable

# the registry and verdicts live in a leaf module; re-exported here for plugins and callers
from herl.checks import (  # noqa: F401
    CHECKS, JUDGE_KIND, MET, UNKNOWN, UNMET, Check, Verdict, check_params, describe_item, import_plugins,
    is_known_kind, register_check,
)
# the IFEval instruction ids register themselves as kinds (herl.ifeval imports only herl.checks)
from herl import ifeval as _ifeval_kinds  # noqa: F401

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


@dataclass(frozen=True)
class GradeInput:
    rubric: list[dict]
    response: str
    messages: list[dict]

    @property
    def prompt(self) -> str:
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


class RubricGrader:
    """Verifiable items by their checks; `judge` items by an LLM judge, made on first need.

    `grade_cfg` is schemas.config.GradeConfig; `cache_path` is where the judge cache lives."""

    def __init__(self, grade_cfg, cache_path=None):
        self.cfg, self.cache_path = grade_cfg, cache_path
        self.verifiable = VerifiableGrader()
        self.judge = None

    def grade_many(self, inputs: list[GradeInput]) -> list[list[Verdict]]:
        from herl.judge import JudgeTask, conversation_text, make_judge

        results, tasks, slots = [], [], []
        for i, inp in enumerate(inputs):
            results.append(self.verifiable.grade(inp.rubric, inp.response, inp.prompt))
            idx = [j for j, it in enumerate(inp.rubric) if it["kind"] == JUDGE_KIND]
            if idx:
                tasks.append(JudgeTask(conversation_text(inp.messages), inp.response,
                                       tuple(inp.rubric[j]["description"] for j in idx),
                                       tuple(float(inp.rubric[j]["weight"]) for j in idx)))
                slots.append((i, idx))
        if tasks:
            if self.judge is None:
                self.judge = make_judge(self.cfg.judge, self.cache_path)
            for (i, idx), verdicts in zip(slots, self.judge.grade_many(tasks)):
                for j, v in zip(idx, verdicts):
                    results[i][j] = v
        return results

    def score_many(self, inputs: list[GradeInput]) -> list[tuple[float | None, str]]:
        """RaR's implicit reward: a holistic judge score in [0, 1] per input (None where none could be had)."""
        from herl.judge import JudgeTask, conversation_text, make_judge

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


# ---- general checks ---------------------------------------------------------------


def _range_text(unit: str, min=None, max=None) -> str:
    if min is not None and max is not None:
        return f"Use between {min} and {max} {unit}."
    if min is not None:
        return f"Use at least {min} {unit}."
    return f"Use at most {max} {unit}."


def _in_range(n: int, min, max) -> bool:
    return (min is None or n >= min) and (max is None or n <= max)


@register_check("no_capitals", describe=lambda: "Use no capital letters.")
def no_capitals(response: str) -> tuple[bool, str]:
    caps = [c for c in response if c.isupper()]
    return not caps, f"capitals: {''.join(caps[:10])!r}" if caps else ""


@register_check("no_digits", describe=lambda: "Use no digits.")
def no_digits(response: str) -> tuple[bool, str]:
    digits = [c for c in response if c.isdigit()]
    return not digits, f"digits: {''.join(digits[:10])!r}" if digits else ""


@register_check("include", describe=lambda text, case_sensitive=False: f"Include {text!r}.")
def include(response: str, *, text: str, case_sensitive: bool = False) -> bool:
    return (text in response) if case_sensitive else (text.lower() in response.lower())


@register_check("exclude", describe=lambda text, case_sensitive=False: f"Do not use {text!r}.")
def exclude(response: str, *, text: str, case_sensitive: bool = False) -> bool:
    return not include(response, text=text, case_sensitive=case_sensitive)


@register_check("char_length", describe=lambda min=None, max=None: _range_text("characters", min, max))
def char_length(response: str, *, min: int | None = None, max: int | None = None) -> tuple[bool, str]:
    n = len(response.strip())
    return _in_range(n, min, max), f"{n} characters"


@register_check("word_length", describe=lambda min=None, max=None: _range_text("words", min, max))
def word_length(response: str, *, min: int | None = None, max: int | None = None) -> tuple[bool, str]:
    n = len(re.findall(r"\w+", response))
    return _in_range(n, min, max), f"{n} words"


@register_check("token_length", describe=lambda min=None, max=None, tokenizer=None: _range_text("tokens", min, max))
def token_length(response: str, *, min: int | None = None, max: int | None = None,
                 tokenizer: str | None = None) -> tuple[bool, str]:
    """Tokens of a local tokenizer folder if given, else words and punctuation marks."""
    if tokenizer:
        n = len(_tokenizer(tokenizer)(response, add_special_tokens=False)["input_ids"])
    else:
        n = len(re.findall(r"\w+|[^\w\s]", response))
    return _in_range(n, min, max), f"{n} tokens"


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


@register_check("ends_with", describe=lambda text: f"End with {text!r}.")
def ends_with(response: str, *, text: str) -> bool:
    return response.rstrip().endswith(text)


@register_check("starts_with", describe=lambda text: f"Start with {text!r}.")
def starts_with(response: str, *, text: str) -> bool:
    return response.lstrip().startswith(text)


@register_check("regex", describe=lambda pattern, must_match=True, flags="":
                f"{'Match' if must_match else 'Do not match'} the pattern /{pattern}/{flags}.")
def regex(response: str, *, pattern: str, must_match: bool = True, flags: str = "") -> bool:
    fl = 0
    for ch in flags:
        fl |= {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}[ch]
    return bool(re.search(pattern, response, fl)) == must_match


_FINAL_ANSWER = re.compile(r"(?:\\boxed\{([^{}]*)\}|(?:final answer|answer)\s*(?:is|:)\s*([^\n]+))", re.IGNORECASE)


def _extract_answer(response: str) -> str:
    """The answer part of a response: \\boxed{...}, "answer: ..." / "answer is ...", or the last line."""
    found = _FINAL_ANSWER.findall(response)
    if found:
        boxed, stated = found[-1]
        return (boxed or stated).strip()
    lines = [ln for ln in response.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _normalise(text: str) -> str:
    text = text.strip().lower().rstrip(".")
    text = re.sub(r"[\s]+", " ", text)
    return text.strip("*`\"' ")


@register_check("exact_answer", describe=lambda answer, **_: f"Give the answer {answer!r}.")
def exact_answer(response: str, *, answer: str | list[str], extract: bool = True) -> tuple[bool, str]:
    """Match after normalisation (case, surrounding space/quotes/markdown, a final period)."""
    got = _normalise(_extract_answer(response) if extract else response)
    accepted = [answer] if isinstance(answer, str) else list(answer)
    return got in {_normalise(a) for a in accepted}, f"answer {got!r}"


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*(?:e-?\d+)?|-?\.\d+")


@register_check("numeric_answer", describe=lambda answer, **_: f"Give the numeric answer {answer}.")
def numeric_answer(response: str, *, answer: float, rel_tol: float = 1e-6, abs_tol: float = 1e-9,
                   extract: bool = True) -> tuple[bool, str]:
    """The last number of the answer part (commas and a trailing % ignored) equals `answer`."""
    import math

    text = _extract_answer(response) if extract else response
    numbers = _NUMBER.findall(text.replace("%", ""))
    if not numbers:
        return False, "no number found"
    got = float(numbers[-1].replace(",", ""))
    return math.isclose(got, float(answer), rel_tol=rel_tol, abs_tol=abs_tol), f"number {got}"


def _strip_fence(text: str) -> str:
    text = text.strip()
    m = re.fullmatch(r"```[a-zA-Z]*\s*\n?(.*?)\n?```", text, re.DOTALL)
    return m.group(1).strip() if m else text


@register_check("json", describe=lambda schema=None: "Answer in valid JSON" + (" following the given schema." if schema else "."))
def json_valid(response: str, *, schema: dict | None = None) -> tuple[bool, str]:
    """The response (optionally in a ``` fence) parses as JSON and, if given, satisfies the JSON Schema."""
    try:
        value = json.loads(_strip_fence(response))
    except ValueError as exc:
        return False, f"invalid JSON: {exc}"
    if schema is not None:
        import jsonschema

        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=lambda e: list(e.path))
        if errors:
            return False, f"schema: {errors[0].message}"
    return True, ""

