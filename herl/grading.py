"""Rubric grading: verifiable checks, the grader interface, and reward aggregation.

A rubric item is {item_id, description, weight, kind, params}. `kind` names a check in
the registry; `params` (a JSON object) are its keyword arguments. Add a check with

    @register_check("my_kind")
    def my_kind(response: str, *, limit: int) -> bool: ...

A check returns a bool (met / unmet) or (bool, detail). A check that raises gives the
verdict `unknown` with the error as detail; never a silent 0/1.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

MET, UNMET, UNKNOWN = "met", "unmet", "unknown"

CHECKS: dict[str, Callable[..., bool | tuple[bool, str]]] = {}


def register_check(kind: str):
    """Decorator: make `fn(response, **params)` the check for rubric items of this kind."""

    def deco(fn):
        if kind in CHECKS:
            raise ValueError(f"check kind {kind!r} is already registered")
        CHECKS[kind] = fn
        return fn

    return deco


@dataclass(frozen=True)
class Verdict:
    verdict: str  # met / unmet / unknown
    grader: str
    detail: str = ""


class Grader(Protocol):
    def grade(self, rubric: list[dict], response: str) -> list[Verdict]:
        """One verdict per rubric item, in rubric order."""


class VerifiableGrader:
    """Grades items whose `kind` is a registered check."""

    name = "verifiable"

    def grade(self, rubric: list[dict], response: str) -> list[Verdict]:
        out = []
        for item in rubric:
            fn = CHECKS.get(item["kind"])
            if fn is None:
                out.append(Verdict(UNKNOWN, self.name, f"no check registered for kind {item['kind']!r}"))
                continue
            try:
                params = json.loads(item["params"]) if item["params"] else {}
                res = fn(response, **params)
            except Exception as exc:  # a broken check must surface as unknown, not as a verdict
                out.append(Verdict(UNKNOWN, self.name, f"{type(exc).__name__}: {exc}"))
                continue
            ok, detail = res if isinstance(res, tuple) else (res, "")
            out.append(Verdict(MET if ok else UNMET, self.name, detail))
        return out


def aggregate(verdicts: Iterable[str], weights: Iterable[float], mode: str = "weighted",
              unknown_policy: str = "unmet") -> tuple[float, int, int, int]:
    """Reward in [0, 1] from verdicts (HERL.md step 2). Returns (reward, met, total, unknown).

    weighted: sum(w * met) / sum(w for w > 0), clipped to [0, 1] (negative weights are
    pitfalls that cost points when met); fraction: met / total; all: 1 if every item met.
    unknown_policy: `unmet` counts unknown as unmet; `drop` removes it from the sums.
    """
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
        raise ValueError(f"unknown reward mode {mode!r}: use weighted, fraction or all")
    return reward, n_met, len(pairs), n_unknown


# ---- the checks the built-in task uses ------------------------------------------------


@register_check("no_capitals")
def no_capitals(response: str) -> tuple[bool, str]:
    caps = [c for c in response if c.isupper()]
    return not caps, f"capitals: {''.join(caps[:10])!r}" if caps else ""


@register_check("no_digits")
def no_digits(response: str) -> tuple[bool, str]:
    digits = [c for c in response if c.isdigit()]
    return not digits, f"digits: {''.join(digits[:10])!r}" if digits else ""


@register_check("include")
def include(response: str, *, text: str, case_sensitive: bool = False) -> bool:
    return (text in response) if case_sensitive else (text.lower() in response.lower())


@register_check("exclude")
def exclude(response: str, *, text: str, case_sensitive: bool = False) -> bool:
    return not include(response, text=text, case_sensitive=case_sensitive)


@register_check("char_length")
def char_length(response: str, *, min: int | None = None, max: int | None = None) -> tuple[bool, str]:
    n = len(response.strip())
    ok = (min is None or n >= min) and (max is None or n <= max)
    return ok, f"{n} characters"


@register_check("word_length")
def word_length(response: str, *, min: int | None = None, max: int | None = None) -> tuple[bool, str]:
    n = len(re.findall(r"\w+", response))
    ok = (min is None or n >= min) and (max is None or n <= max)
    return ok, f"{n} words"


@register_check("ends_with")
def ends_with(response: str, *, text: str) -> bool:
    return response.rstrip().endswith(text)


@register_check("starts_with")
def starts_with(response: str, *, text: str) -> bool:
    return response.lstrip().startswith(text)


@register_check("regex")
def regex(response: str, *, pattern: str, must_match: bool = True, flags: str = "") -> bool:
    fl = 0
    for ch in flags:
        fl |= {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}[ch]
    return bool(re.search(pattern, response, fl)) == must_match
