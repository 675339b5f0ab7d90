"""General verifiable checks, registered as rubric kinds on import: `regex`, `exact_answer`,
`numeric_answer`, `char_length`, `word_length`, `token_length`, `json`, `include`,
`exclude`, `starts_with`, `ends_with`, `no_capitals`, `no_digits` (IFEval's instruction
checks are in herl.grading.ifeval)."""

from __future__ import annotations

import json
import re

from herl.grading.checks import register_check


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

