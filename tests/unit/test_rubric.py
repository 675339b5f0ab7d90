"""Verifiable checks and reward aggregation, with hand-computed numbers."""

from __future__ import annotations

import json

import pytest

from herl.grading.rubric import (
    CHECKS,
    MET,
    UNKNOWN,
    UNMET,
    VerifiableGrader,
    aggregate,
    describe_item,
    register_check,
)


def item(kind, **params):
    return {"item_id": kind, "description": kind, "weight": 1.0, "kind": kind, "params": json.dumps(params)}


@pytest.mark.parametrize("kind,params,response,expected", [
    ("no_capitals", {}, "all lower case.", MET),
    ("no_capitals", {}, "one Capital", UNMET),
    ("no_digits", {}, "no digits here", MET),
    ("no_digits", {}, "route 66", UNMET),
    ("include", {"text": "e"}, "hEllo", MET),  # case-insensitive by default
    ("include", {"text": "E", "case_sensitive": True}, "hello", UNMET),
    ("exclude", {"text": "x"}, "tax", UNMET),
    ("char_length", {"max": 5}, "abcde  ", MET),  # trailing whitespace is not counted
    ("char_length", {"max": 5}, "abcdef", UNMET),
    ("char_length", {"min": 3}, "ab", UNMET),
    ("word_length", {"min": 2, "max": 3}, "two words", MET),
    ("ends_with", {"text": "."}, "done.\n", MET),
    ("ends_with", {"text": "."}, "done", UNMET),
    ("starts_with", {"text": "so"}, "  so it begins", MET),
    ("regex", {"pattern": "^a+$", "flags": "m"}, "b\naaa", MET),
    ("regex", {"pattern": "bad", "must_match": False}, "good", MET),
])
def test_checks(kind, params, response, expected):
    (v,) = VerifiableGrader().grade([item(kind, **params)], response)
    assert v.strict == expected


def test_unknown_kind_and_broken_check_give_unknown_not_a_verdict():
    vs = VerifiableGrader().grade([item("nope"), item("char_length", maximum=3)], "text")
    assert [v.strict for v in vs] == [UNKNOWN, UNKNOWN]
    assert "no check registered" in vs[0].detail and "TypeError" in vs[1].detail


def test_register_check_decorator():
    @register_check("test_palindrome")
    def palindrome(response: str) -> bool:
        return response == response[::-1]

    try:
        assert VerifiableGrader().grade([item("test_palindrome")], "abba")[0].strict == MET
        with pytest.raises(ValueError, match="already registered"):
            register_check("test_palindrome")(palindrome)
    finally:
        del CHECKS["test_palindrome"]


def test_aggregate_weighted_with_pitfall():
    # weights 5, 3, 1, -2 (pitfall): met, unmet, met, met -> (5 + 1 - 2) / 9
    r, met, total, unknown = aggregate([MET, UNMET, MET, MET], [5, 3, 1, -2])
    assert r == pytest.approx(4 / 9) and (met, total, unknown) == (3, 4, 0)
    # clipped at 0 when pitfalls outweigh
    assert aggregate([UNMET, MET], [1, -3])[0] == 0.0


def test_aggregate_modes_and_unknown_policy():
    verdicts, weights = [MET, UNKNOWN, UNMET, MET], [1, 1, 1, 1]
    assert aggregate(verdicts, weights, "fraction")[0] == pytest.approx(2 / 4)
    assert aggregate(verdicts, weights, "fraction", "drop")[0] == pytest.approx(2 / 3)
    assert aggregate(verdicts, weights, "fraction", "drop")[1:] == (2, 3, 1)
    assert aggregate(verdicts, weights, "all")[0] == 0.0
    assert aggregate([MET, UNKNOWN], [1, 1], "all", "drop")[0] == 1.0
    assert aggregate([UNKNOWN], [1], "weighted", "drop") == (0.0, 0, 0, 1)
    with pytest.raises(ValueError):
        aggregate([MET], [1], "median")


def test_plugins_register_checks_for_runs_and_herl_grade(tmp_path, monkeypatch, capsys):
    from herl.commands.cli import main

    (tmp_path / "herl_test_plugin_checks.py").write_text(
        "from herl.grading.rubric import register_check\n"
        "@register_check('test_max_lines', describe=lambda n: f'Use at most {n} lines.')\n"
        "def max_lines(response, *, n):\n    return len(response.strip().splitlines()) <= n\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt_id": "p", "messages": [{"role": "user", "content": "q"}],
                               "rubric": [{"item_id": "l", "kind": "test_max_lines", "params": {"n": 1}}],
                               "response": "one line"}) + "\n")
    try:
        assert main(["grade", "--input", str(src), "--output", str(tmp_path / "o.parquet")]) == 2
        assert "unknown kind 'test_max_lines'" in capsys.readouterr().err
        assert main(["grade", "--input", str(src), "--output", str(tmp_path / "o.parquet"),
                     "--plugin", "herl_test_plugin_checks"]) == 0
        assert "mean_reward_strict         1.0000" in capsys.readouterr().out
        assert describe_item("test_max_lines", {"n": 2}) == "Use at most 2 lines."
    finally:
        CHECKS.pop("test_max_lines", None)


# ---- one scoring path for training rewards, `herl grade` and `herl eval` ------------


def _grade_with(tmp_path, **grade_overrides):
    from herl.grading.rubric import grade_samples
    from herl.runs.rundir import open_run
    from schemas.config import load_config

    cfg = load_config(None, {"runs_dir": str(tmp_path), "run_id": "r",
                             **{f"grade.{k}": v for k, v in grade_overrides.items()}})
    rubric = [dict(item("punctuation:no_comma"), item_id="nc"), dict(item("no_digits"), item_id="nd"),
              dict(item("nope"), item_id="unk")]
    prompt = {"prompt_id": "p", "messages": [{"role": "user", "content": "q"}], "rubric": rubric}
    # strict: the comma on the first line fails no_comma; loose drops that line and it is met
    run = open_run(cfg)
    rows, scores, _ = grade_samples(run.run_id, run.judge_cache, 0, {"p": prompt},
                                    [("a", "p", "Sure, here:\nno commas here"), ("b", "p", "a, 1")], cfg.grade)
    return rows, scores


def test_grade_stage_follows_mode_reward_and_unknown_policy(tmp_path):
    rows, scores = _grade_with(tmp_path / "strict")
    assert [r["verdict"] for r in rows if r["sample_id"] == "a"] == [UNMET, MET, UNKNOWN]
    assert scores["a"] == {"reward": pytest.approx(1 / 3), "items_met": 1, "items_scored": 3, "items_unknown": 1,
                           "looped": False}
    rows, scores = _grade_with(tmp_path / "loose", mode="loose")
    assert [r["verdict"] for r in rows if r["sample_id"] == "a"] == [MET, MET, UNKNOWN]
    assert [r["verdict_strict"] for r in rows if r["sample_id"] == "a"] == [UNMET, MET, UNKNOWN]
    assert scores["a"]["reward"] == pytest.approx(2 / 3) and scores["a"]["items_met"] == 2
    # unknown dropped: the reward is over the two graded items, and items_scored says so
    _, scores = _grade_with(tmp_path / "drop", mode="loose", unknown_policy="drop")
    assert scores["a"] == {"reward": 1.0, "items_met": 2, "items_scored": 2, "items_unknown": 1, "looped": False}
    _, scores = _grade_with(tmp_path / "all", reward="all", unknown_policy="drop")
    assert scores["a"]["reward"] == 0.0 and scores["b"]["reward"] == 0.0


def test_pitfalls_subtract_or_ignore():
    from herl.grading.rubric import aggregate

    verdicts, weights = ["met", "met", "unmet"], [5.0, -2.0, 3.0]
    assert aggregate(verdicts, weights)[0] == pytest.approx((5 - 2) / 8)  # HealthBench: the pitfall costs 2
    assert aggregate(verdicts, weights, pitfalls="ignore")[0] == pytest.approx(5 / 8)  # the reference: weight 0
    assert aggregate(["unmet", "met"], [1.0, -3.0])[0] == 0.0  # clipped at 0
    assert aggregate(["unmet", "met"], [1.0, -3.0], pitfalls="ignore")[0] == 0.0
