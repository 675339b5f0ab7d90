"""The check registry and the verdict type: the leaf every grader builds on.

herl.rubric (verifiable and judge graders), herl.ifeval (IFEval's checks, registered
here), herl.judge and the importers use it; it imports nothing of herl's but its errors. Plugins
register checks with `herl.rubric.register_check` (re-exported there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from schemas.errors import UserError

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


class PluginImportError(UserError, ImportError):
    """A plugin module named in the config (or by --plugin) cannot be imported."""


def import_plugins(modules: Iterable[str]) -> None:
    """Import modules that register checks (config `plugins`, `herl grade --plugin`)."""
    import importlib
    import re

    for name in modules:
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
            raise PluginImportError(f"plugin {name!r} (config 'plugins') is not a module name: give a dotted Python "
                                    "module name such as my_checks or my_pkg.checks, importable from the Python path")
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise PluginImportError(f"cannot import plugin module {name!r} (config 'plugins'): {exc}") from None
        except Exception as exc:  # the plugin's own code failed while it was imported
            raise PluginImportError(f"plugin module {name!r} (config 'plugins') raised {type(exc).__name__} when "
                                    f"imported: {exc}") from None


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
