"""The hindsight prompt (herl/data/hindsight_prompt.py): its text, full and naive, pitfalls, and
the reference wording rendered through the chat template."""

from __future__ import annotations

import pytest

RUBRIC = [{"description": "Use no commas.", "weight": 1.0}, {"description": "End with a period.", "weight": 1.0},
          {"description": "Be short.", "weight": 1.0}]
HEAD = "Here is an instruction, a draft answer to it, and a check of the draft against a rubric.\n\n## Instruction\nWrite.\n\n"
TAIL = ("## Draft\ndraft, text\n\n## Task\nRevise the draft. Keep everything that satisfies the rubric, fix every "
        "item that is not\nsatisfied, do not add new facts, and reply with the revised answer only.")


def test_hindsight_prompt_text_full_and_naive():
    from herl.data.hindsight_prompt import build_hindsight_prompt

    msgs = [{"role": "user", "content": "Write."}]
    full = build_hindsight_prompt(msgs, RUBRIC, ["met", "unmet", "unknown"], "draft, text")
    assert full == HEAD + ("## Rubric status\nSatisfied:\n- Use no commas.\n\nNot satisfied:\n- End with a period.\n\n"
                           "Unclear:\n- Be short.\n\n") + TAIL
    naive = build_hindsight_prompt(msgs, RUBRIC, ["met", "unmet", "unknown"], "draft, text", naive=True)
    assert naive == HEAD + "## Rubric\n- Use no commas.\n- End with a period.\n- Be short.\n\n" + TAIL
    weighted = build_hindsight_prompt(msgs, [dict(r, weight=w) for r, w in zip(RUBRIC, [5.0, -2.0, 1.5])],
                                      ["met", "unmet", "met"], "d")
    assert "Satisfied:\n- Use no commas. (weight 5)\n- Be short. (weight 1.5)\n\nNot satisfied:\n- none\n\n" \
           "Mistakes the draft avoids (keep avoiding them):\n- End with a period. (weight -2)\n\n## Draft" in weighted


def test_hindsight_prompt_puts_committed_pitfalls_with_what_to_fix():
    """A met pitfall is a mistake the draft made: never listed as satisfied (HealthBench-style rubric)."""
    from herl.data.hindsight_prompt import build_hindsight_prompt

    rubric = [{"description": "Advises urgent care if red flags.", "weight": 5.0},
              {"description": "Recommends antibiotics for a viral infection.", "weight": -8.0},
              {"description": "Mentions hydration.", "weight": 2.0},
              {"description": "Gives a dangerous dose.", "weight": -10.0},
              {"description": "Asks about allergies.", "weight": -1.0}]
    text = build_hindsight_prompt([{"role": "user", "content": "I have a cold."}], rubric,
                                  ["met", "met", "unmet", "unmet", "unknown"], "Take antibiotics and see a doctor.")
    assert text == (
        "Here is an instruction, a draft answer to it, and a check of the draft against a rubric.\n\n"
        "## Instruction\nI have a cold.\n\n"
        "## Rubric status\n"
        "Satisfied:\n- Advises urgent care if red flags. (weight 5)\n\n"
        "Not satisfied:\n- Mentions hydration. (weight 2)\n\n"
        "Mistakes the draft makes (remove them):\n- Recommends antibiotics for a viral infection. (weight -8)\n\n"
        "Mistakes the draft avoids (keep avoiding them):\n- Gives a dangerous dose. (weight -10)\n\n"
        "Unclear:\n- Asks about allergies. (weight -1)\n\n"
        "## Draft\nTake antibiotics and see a doctor.\n\n"
        "## Task\nRevise the draft. Keep everything that satisfies the rubric, fix every item that is not\n"
        "satisfied, do not add new facts, and reply with the revised answer only.")


def test_reference_wording_and_raw_rendering(tmp_path):
    """hindsight.template = reference: the authors' constraint template, verbatim in shape;
    hindsight.chat_template = false: the text is tokenized as is; a user's own template."""
    from herl.data.hindsight_prompt import build_hindsight_prompt, encode_prompt
    from herl.generation.engines import render_chat
    from herl.models.paths import resolve_model_path
    from herl.models.tokenizer import load_tokenizer

    rubric = [{"description": "Use no commas.", "weight": 1.0}, {"description": "End with a period.", "weight": 1.0},
              {"description": "Mentions a dangerous dose.", "weight": -2.0}, {"description": "Be short.", "weight": 1.0}]
    text = build_hindsight_prompt([{"role": "user", "content": "Write."}], rubric, ["met", "unmet", "met", "unknown"],
                                  "draft, text", wording="reference")
    assert text == (
        "You are a revise assistant. Keep all already satisfied constraints intact and fix the unmet ones. "
        "Avoid adding new facts.\n\n[Instruction]\nWrite.\n\n[Candidate]\nSatisfied: 1. Use no commas.\n"
        "Unmet: 2. End with a period., 3. Avoid: Mentions a dangerous dose., 4. Be short.\nDraft:\ndraft, text\n\n"
        "Return only the revised answer that satisfies the unmet constraints while preserving the satisfied ones.")
    tok = load_tokenizer(resolve_model_path("builtin:tiny"))
    raw_text, raw_ids = encode_prompt(tok, text, chat_template=False)
    chat_text, chat_ids = encode_prompt(tok, text, chat_template=True)
    assert raw_text == text and raw_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert (chat_text, chat_ids) == render_chat(tok, [{"role": "user", "content": text}]) and len(chat_ids) > len(raw_ids)

    own = tmp_path / "mine.j2"
    own.write_text("Fix: {{ (unmet + committed) | map(attribute='description') | join('; ') }}\n{{ draft }}")
    assert build_hindsight_prompt([{"role": "user", "content": "W"}], rubric, ["met", "unmet", "met", "unknown"],
                                  "d", wording=str(own)) == "Fix: End with a period.; Mentions a dangerous dose.\nd"
    from schemas.config import ConfigError, load_config

    assert load_config(None, {"hindsight.template": str(own)}).hindsight.template == str(own)
    with pytest.raises(ConfigError, match="hindsight.template"):
        load_config(None, {"hindsight.template": str(tmp_path / "missing.j2")})


def test_reference_wording_tells_the_model_to_avoid_pitfalls():
    """A committed pitfall is an unmet "Avoid: ..." constraint, an avoided one a satisfied
    "Avoid: ..." one: "satisfy the unmet constraints" never asks for the mistake."""
    from herl.data.hindsight_prompt import build_hindsight_prompt

    rubric = [{"description": "Mentions hydration.", "weight": 2.0},
              {"description": "Recommends antibiotics for a viral infection.", "weight": -8.0},
              {"description": "Gives a dangerous dose.", "weight": -10.0}]
    text = build_hindsight_prompt([{"role": "user", "content": "I have a cold."}], rubric, ["unmet", "met", "unmet"],
                                  "Take antibiotics.", wording="reference")
    assert "Satisfied: 3. Avoid: Gives a dangerous dose.\n" in text
    assert "Unmet: 1. Mentions hydration., 2. Avoid: Recommends antibiotics for a viral infection.\n" in text


@pytest.mark.parametrize("wording", ["herl", "reference"])
def test_a_multi_turn_prompt_is_shown_whole(wording):
    """Earlier assistant turns stay in the hindsight prompt, each message under its role
    (a later user turn often refers to them, as in HealthBench conversations)."""
    from herl.data.hindsight_prompt import build_hindsight_prompt

    msgs = [{"role": "system", "content": "Be careful."}, {"role": "user", "content": "My knee hurts."},
            {"role": "assistant", "content": "Since when?"}, {"role": "user", "content": "Two days, after a fall."}]
    text = build_hindsight_prompt(msgs, RUBRIC, ["met", "unmet", "met"], "d", wording=wording)
    assert ("System: Be careful.\n\nUser: My knee hurts.\n\nAssistant: Since when?\n\n"
            "User: Two days, after a fall.") in text
    single = build_hindsight_prompt(msgs[1:2], RUBRIC, ["met", "unmet", "met"], "d", wording=wording)
    assert "My knee hurts." in single and "User:" not in single


def test_goals_wording_restates_what_was_missed_without_the_draft():
    from herl.data.hindsight_prompt import build_hindsight_prompt

    rubric = [*RUBRIC, {"description": "Recommends antibiotics.", "weight": -1.0}]
    text = build_hindsight_prompt([{"role": "user", "content": "Write."}], rubric, ["met", "unmet", "unknown", "met"],
                                  "draft, text", wording="goals", details=["", "ends with '!'", "", ""])
    assert text == ("Write.\n\nMake sure your answer follows these requirements:\n"
                    "- End with a period. (your last answer: ends with '!')\n- Be short.\n"
                    "- Avoid: Recommends antibiotics.")
    assert "draft, text" not in text and "Use no commas." not in text


def test_what_the_herl_wording_shows_is_a_choice():
    """show_items = unmet leaves out what the draft got right; show_draft = false leaves out
    the draft (and asks for a new answer); details add the grader's own account."""
    from herl.data.hindsight_prompt import build_hindsight_prompt

    msgs, verdicts = [{"role": "user", "content": "Write."}], ["met", "unmet", "unknown"]
    unmet = build_hindsight_prompt(msgs, RUBRIC, verdicts, "draft, text", show_items="unmet")
    assert "Satisfied:" not in unmet and "Use no commas." not in unmet
    assert "Not satisfied:\n- End with a period.\n\nUnclear:\n- Be short.\n\n## Draft\ndraft, text" in unmet
    no_draft = build_hindsight_prompt(msgs, RUBRIC, verdicts, "draft, text", show_draft=False,
                                      details=["0 commas", "ends with '!'", ""])
    assert "draft, text" not in no_draft and "## Draft" not in no_draft
    assert no_draft.startswith("Here is an instruction and a check of an earlier answer to it against a rubric.")
    assert "- Use no commas. [the last answer: 0 commas]\n" in no_draft
    assert no_draft.endswith("Answer the instruction again. Satisfy every item of the rubric, and reply with the "
                             "answer\nonly.")
    detailed = build_hindsight_prompt(msgs, RUBRIC, verdicts, "d", details=["", "ends with '!'", ""])
    assert "- End with a period. [the draft: ends with '!']\n" in detailed
    ref = build_hindsight_prompt(msgs, RUBRIC, verdicts, "d", wording="reference", show_items="unmet",
                                 details=["", "ends with '!'", ""])
    assert "Satisfied:" not in ref and "Unmet: 2. End with a period. [ends with '!'], 3. Be short.\n" in ref


def test_hindsight_view_settings_are_checked_and_do_not_redo_old_runs():
    from schemas.config import ConfigError, load_config, stage_config_hash

    with pytest.raises(ConfigError, match="show_draft"):
        load_config(None, {"hindsight.template": "reference", "hindsight.show_draft": False})
    assert load_config(None, {"hindsight.template": "goals"}).hindsight.template == "goals"
    # a run made before these settings existed has the same stage hashes at their defaults
    import hashlib
    import json

    from schemas.config import STAGE_CONFIG

    cfg = load_config(None, {})
    dumped = cfg.model_dump(mode="json")
    part = {k: dumped[k] for k in STAGE_CONFIG["hindsight"]}
    for key in ("show_draft", "show_items", "show_details", "max_train_prompt_tokens"):
        del part["hindsight"][key]
    del part["vllm"]["between_iterations"]
    if "grade" in part:  # grade.judge.probe (a pre-flight check) came later too, and is not hashed
        del part["grade"]["judge"]["probe"]
    part["plugins"] = []
    old = hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]
    assert stage_config_hash(cfg, "hindsight") == old
    assert stage_config_hash(load_config(None, {"hindsight.show_details": True}), "hindsight") != old
    assert stage_config_hash(load_config(None, {"vllm.between_iterations": "restart"}), "hindsight") == old
