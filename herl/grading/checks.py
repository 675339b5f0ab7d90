"""The check registry and the verdict type: the leaf every grader builds on.

herl.grading.rubric (verifiable and judge graders), herl.grading.ifeval (IFEval's checks, registered
here), herl.grading.judge and the importers use it; it imports nothing of herl's but its errors. Plugins
register checks with `herl.grading.rubric.register_check` (re-exported there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

MET, UNMET, UNKNOWN = "met", "unmet", "unknown"
JUDGE_KIND = "judge"


@dataclass(frozen=True)
class Check:
    fn: Callable[..., bool | tuple[bool, str]]
    describe: Callable[..., str] | None = None
    needs_prompt: bool = False  # the check receives the prompt text as `prompt=`


CHECKS: dict[str, Check] = {}


def register_check(kind: str, describe: Callable[..., str] | None = None, needs_prompt: bool = False):
    """Decorator: make `fn(response, **params)` the check for rubric items of this kind."""

    def deco(fn):
        if kind in CHECKS or kind == JUDGE_KIND:
            raise ValueError(f"check kind {kind!r} is already registered")
        CHECKS[kind] = Check(fn, describe, needs_prompt)
        return fn

    return deco


def is_known_kind(kind: str) -> bool:
    return kind == JUDGE_KIND or kind in CHECKS


def check_params(kind: str, params: dict) -> None:
    """Raise TypeError unless `params` are keyword arguments the check of `kind` accepts
    (all required ones present, none unknown). Judge items take any params."""
    import inspect

    check = CHECKS.get(kind)
    if check is None:
        return
    try:
        inspect.signature(check.fn).bind("", **params, **({"prompt": ""} if check.needs_prompt else {}))
    except TypeError as exc:
        raise TypeError(f"{exc} (params given: {sorted(params) or 'none'})") from None


def describe_item(kind: str, params: dict) -> str:
    """A readable sentence for an item from its kind and params ("Answer with at least 300 words.")."""
    check = CHECKS.get(kind)
    if check is None or check.describe is None:
        args = ", ".join(f"{k}={v!r}" for k, v in params.items())
        return f"Satisfy the check {kind}({args})."
    return check.describe(**params)


@dataclass(frozen=True)
class Verdict:
    """One rubric item's grade. The `verdicts` table stores both (`verdict_strict`,
    `verdict_loose`) and, as `verdict`, the one `grade.mode` picks for the reward."""

    strict: str  # met / unmet / unknown: the check on the response as it is
    grader: str
    detail: str = ""
    loose: str | None = None  # IFEval's loose verdict; None where it equals the strict one

    @property
    def loose_verdict(self) -> str:
        return self.loose or self.strict
