"""The authors' rules herl follows, one test each: the repetition rule, near ties, long
prompts (dropped from the pool, hindsight prompts left-trimmed for training), epochs, the
reference judge wording (over HTTP: tests/unit/test_judge.py) and the renamed Dr. GRPO
aggregation. (The whole-batch rule and a group of one: tests/unit/test_sql.py; all of them
against a port of the reference's code: tests/unit/test_advantages_parity.py.)"""

from __future__ import annotations

import pyarrow as pa
import pytest

from herl.grading.rubric import LOOP_TAIL_CHARS, grade_samples, is_looping
from herl.sql import WHITESPACE, run_sql_file
from schemas.config import load_config
from schemas.tables import TABLES
from stages import advantages


def reference_contain_repeated_text(text: str) -> bool:
    """sikelifei/HeRL verl/utils/reward_score/if_score/__init__.py lines 54-61, verbatim."""
    detected_text = text[-160:]
    test_spilt = text.split(detected_text)
    return len(test_spilt) > 3


LOOPING = [
    "la la " * 120,                                    # a period of 6 repeated well past 3 x 160
    "Intro. " + "## Heading\nThe same line.\n" * 40,   # a model copying headings in a loop
    "x" * 480,                                         # exactly three tails, back to back
]
NOT_LOOPING = [
    "la la " * 80,         # 480 characters, but the tail's alignment leaves only two whole copies
    "x" * 479,             # two tails and a bit
    "short answer",        # shorter than the tail: it is its own tail, once
    "One. Two. Three. " * 5,
    "a" * 159 + "b",
]


@pytest.mark.parametrize("text", LOOPING + NOT_LOOPING)
def test_is_looping_is_the_reference_rule(text):
    assert is_looping(text) == reference_contain_repeated_text(text)
    assert is_looping(text) == (text in LOOPING)


def test_is_looping_of_an_empty_answer():
    """The reference's split raises on an empty text (its except then scores 0 everywhere);
    herl says an empty answer does not loop."""
    with pytest.raises(ValueError):
        reference_contain_repeated_text("")
    assert not is_looping("")
    assert LOOP_TAIL_CHARS == 160


def test_graded_answers_record_whether_they_loop(tmp_path):
    cfg = load_config(None)
    prompt = {"prompt_id": "p", "messages": [{"role": "user", "content": "write"}],
              "rubric": [{"item_id": "a", "description": "no digits", "weight": 1.0, "kind": "no_digits",
                          "params": "{}"}]}
    _, scores, _ = grade_samples("r", tmp_path / "judge.sqlite", 0, {"p": prompt},
                                 [("a", "p", LOOPING[1]), ("b", "p", "fine")], cfg.grade)
    # the reward stands: the rule only changes what HeRL chooses by
    assert scores["a"]["looped"] and scores["a"]["reward"] == 1.0
    assert not scores["b"]["looped"]


# ---- the SQL choices ------------------------------------------------------------------

def _tables(members: dict[str, list[tuple[float, int, bool]]], revisions=()):
    """members: prompt id -> [(reward, items met, looped)]; revisions: [(candidate, reward, looped)]."""
    ro, rw, hs = [], [], []
    for pid, group in members.items():
        for j, (reward, met, looped) in enumerate(group):
            rid = f"0:{pid}:{j}"
            ro.append({"run_id": "r", "iteration": 0, "rollout_id": rid, "prompt_id": pid, "sample_index": j,
                       "prompt_text": pid, "prompt_token_ids": [1], "response_text": "a", "response_token_ids": [2],
                       "finish_reason": "stop", "num_tokens": 1, "seed": 0, "snapshot_id": "s", "logprobs": None,
                       "temperature": 1.0})
            rw.append({"run_id": "r", "iteration": 0, "rollout_id": rid, "prompt_id": pid, "reward": reward,
                       "items_met": met, "items_scored": 3, "items_unknown": 0, "looped": looped})
    for cand, reward, looped in revisions:
        hs.append({"run_id": "r", "iteration": 0, "revision_id": f"{cand}:rev-0", "candidate_rollout_id": cand,
                   "prompt_id": cand.split(":")[1], "revision_index": 0, "hindsight_prompt_text": "H",
                   "prompt_token_ids": [3], "response_text": "rev", "response_token_ids": [4], "finish_reason": "stop",
                   "num_tokens": 1, "seed": 0, "snapshot_id": "s", "logprobs": None, "temperature": 0.3,
                   "reward": reward, "items_met": 0, "items_scored": 3, "items_unknown": 0, "looped": looped})
    return [pa.Table.from_pylist(rows, schema=TABLES[name].schema)
            for rows, name in ((ro, "rollouts"), (rw, "rewards"), (hs, "hindsight"))]


def _candidates(members, skip_looping=True, tol=1e-6, limit=16):
    ro, rw, _ = _tables(members)
    return run_sql_file("candidates", {"rollouts": ro, "rewards": rw},
                        {"threshold": 1.0, "candidate_limit": limit, "skip_looping": skip_looping,
                         "tie_tolerance": tol}).to_pylist()


def _batch(members, revisions, skip_looping=True, tol=1e-6, replace_top_n=1):
    params = dict(threshold=1.0, skip_looping=skip_looping, tie_tolerance=tol, bonus=True, alpha=0.05,
                  replace_top_n=replace_top_n, fallback=True, std_normalize=True, eps=1e-6, seed="0:0",
                  hindsight_prompt=True, revision_logprobs_at_rollout_temperature=True, whitespace=WHITESPACE)
    return advantages.compute_batch(*_tables(members, revisions), params).to_pylist()


def test_a_looping_answer_is_not_a_candidate_nor_the_groups_best():
    """0.75 loops: the best is the 0.5 answer, which becomes the candidate; without the rule
    the looping 0.75 is the candidate."""
    group = {"p": [(0.75, 3, True), (0.5, 2, False), (0.25, 1, False)]}
    got = _candidates(group)
    assert [c["rollout_id"] for c in got] == ["0:p:1"] and got[0]["best_reward"] == 0.5
    assert [c["rollout_id"] for c in _candidates(group, skip_looping=False)] == ["0:p:0"]
    # a revision of 0.75 ties what the group's best is as chosen (0.5 does not), so it joins
    batch = _batch(group, [("0:p:1", 0.5, False)])
    assert [r["revision_id"] for r in batch if r["kind"] == "hindsight"] == ["0:p:1:rev-0"]


def test_when_every_answer_scores_zero_as_chosen_looping_ones_tie_it():
    """The reference's dense score is 0 for a looping answer: in a group whose best is 0
    they tie it and are candidates, with no items met (ranked after the others)."""
    got = _candidates({"p": [(0.5, 1, True), (0.0, 0, False)]})
    # both tie at 0 with 0 items met as chosen: sample order
    assert [c["rollout_id"] for c in got] == ["0:p:0", "0:p:1"]


def test_a_looping_revision_does_not_beat_the_group_and_looping_answers_are_copied_last():
    group = {"p": [(0.75, 3, True), (0.5, 2, False), (0.25, 1, False), (0.0, 0, False)],
             "q": [(0.25, 1, False), (0.0, 0, False), (0.0, 0, False), (0.0, 0, False)]}
    # p's only revision loops: it counts 0 and cannot join; q's revision keeps the batch
    # usable, so p's slot gets a copy of its best original as chosen: 0.5, not the looping 0.75
    batch = _batch(group, [("0:p:1", 1.0, True), ("0:q:0", 0.0, False)])
    p = [r for r in batch if r["prompt_id"] == "p"]
    assert not [r for r in p if r["kind"] == "hindsight"]
    assert [r["rollout_id"] for r in p if r["kind"] == "duplicate"] == ["0:p:1"]
    # the bonus uses the training rewards: the looping revision's 1.0 raises its draft
    draft = next(r for r in p if r["rollout_id"] == "0:p:1" and r["kind"] == "rollout")
    assert draft["shaped_reward"] == pytest.approx(0.5 + 0.05 * (1.0 - 0.5))
    # without the rule the revision (1.0) beats the group and joins
    off = _batch(group, [("0:p:1", 1.0, True), ("0:q:0", 0.0, False)], skip_looping=False)
    assert [r["revision_id"] for r in off if r["kind"] == "hindsight"] == ["0:p:1:rev-0"]


NEAR = (0.1 + 0.2) / 0.6  # 0.5000000000000001: items of weight 0.1 and 0.2 met
EXACT = 0.3 / 0.6         # 0.5: the item of weight 0.3 met


def test_near_ties_are_ties_for_candidates():
    assert NEAR != EXACT and abs(NEAR - EXACT) < 1e-6
    group = {"p": [(EXACT, 1, False), (NEAR, 2, False), (0.0, 0, False)]}
    # both tie the best; more items met first
    assert [c["rollout_id"] for c in _candidates(group)] == ["0:p:1", "0:p:0"]
    assert [c["rollout_id"] for c in _candidates(group, tol=0.0)] == ["0:p:1"]  # exact equality


def test_a_revision_within_the_tolerance_ties_rather_than_beats():
    group = {"p": [(NEAR, 2, False), (0.0, 0, False), (0.0, 0, False)]}
    # a revision scoring EXACT (a hair below NEAR) ties the group: it qualifies (tier 2)
    batch = _batch(group, [("0:p:0", EXACT, False)])
    assert [r["revision_id"] for r in batch if r["kind"] == "hindsight"] == ["0:p:0:rev-0"]
    # compared exactly it is below the best: it does not qualify, a copy fills the slot
    exact = _batch(group, [("0:p:0", EXACT, False)], tol=0.0)
    assert [r["kind"] for r in exact if r["kind"] != "rollout"] == ["duplicate"]


def test_the_hindsight_stage_binds_the_rules():
    from stages.hindsight import candidate_params

    cfg = load_config(None)
    assert candidate_params(cfg) == {"threshold": 1.0, "candidate_limit": cfg.hindsight.candidate_limit,
                                     "skip_looping": True, "tie_tolerance": 1e-6}


# ---- long prompts ---------------------------------------------------------------------

def test_overlong_prompts_are_dropped_from_the_training_pool_only():
    from herl.data.pool import drop_overlong, split_pool, training_pool
    from herl.generation.engines import render_chat
    from herl.models.paths import resolve_model_path
    from herl.models.tokenizer import load_tokenizer

    cfg = load_config(None, {"task.holdout": 8})
    tok = load_tokenizer(resolve_model_path(cfg.model.path))
    whole, _ = training_pool(cfg)
    lengths = sorted(len(render_chat(tok, p["messages"])[1]) for p in whole)
    limit = lengths[len(lengths) // 2]  # about half are longer
    kept, dropped = drop_overlong(whole, tok, limit)
    assert dropped == sum(n > limit for n in lengths) > 0 and len(kept) + dropped == len(whole)
    cfg2 = load_config(None, {"task.holdout": 8, "task.max_prompt_tokens": limit})
    train, n = training_pool(cfg2, tok)
    assert [p["prompt_id"] for p in train] == [p["prompt_id"] for p in kept] and n == dropped
    # the held-out split does not move with the rule
    from herl.data.pool import task_pool

    assert split_pool(task_pool(cfg2), 8, cfg2.seed)[1] == split_pool(task_pool(cfg), 8, cfg.seed)[1]
    with pytest.raises(ValueError, match="every training prompt is longer"):
        training_pool(load_config(None, {"task.max_prompt_tokens": 1}), tok)


def test_hindsight_prompts_are_left_trimmed_for_training_and_counted():
    from herl.training.batching import Sequences, batch_sequences

    ro, rw, hs = _tables({"p": [(0.5, 2, False), (0.0, 0, False)]}, [("0:p:0", 1.0, False)])
    hs = hs.set_column(hs.schema.get_field_index("prompt_token_ids"), "prompt_token_ids",
                       pa.array([list(range(100, 110))], pa.list_(pa.int32())))
    batch = pa.Table.from_pylist(_batch({"p": [(0.5, 2, False), (0.0, 0, False)]}, [("0:p:0", 1.0, False)]))
    whole = batch_sequences(batch, ro, hs).to_pylist()
    trimmed = batch_sequences(batch, ro, hs, max_prompt_tokens=4)
    rev = [r for r in trimmed.to_pylist() if r["is_hindsight"]]
    assert [r["prompt_token_ids"] for r in whole if r["is_hindsight"]] == [list(range(100, 110))]
    assert [r["prompt_token_ids"] for r in rev] == [[106, 107, 108, 109]] and rev[0]["prompt_trimmed"]
    # rollouts' own prompts are never trimmed
    assert all(r["prompt_token_ids"] == [1] and not r["prompt_trimmed"] for r in trimmed.to_pylist() if not r["is_hindsight"])
    assert Sequences.from_table(trimmed).prompts_trimmed == 1
    assert batch_sequences(batch, ro, hs, max_prompt_tokens=10).column("prompt_trimmed").to_pylist().count(True) == 0


# ---- presets, epochs, the judge wording, the loss mode ----------------------------------

def test_epochs_become_iterations_when_the_run_opens():
    from herl.data.pool import planned_iterations, with_planned_iterations

    cfg = load_config(None, {"task.epochs": 2.5, "task.prompts_per_iteration": 16})
    assert planned_iterations(cfg, 100) == 16  # ceil(2.5 x 100 / 16) = ceil(15.6)
    assert planned_iterations(cfg, 64) == 10
    assert planned_iterations(cfg, 8) == 3  # a pool smaller than a batch: one pass an iteration
    saved = with_planned_iterations(cfg, 100)
    assert saved.iterations == 16 and saved.task.epochs is None  # what config.json holds: resume plans the same
    # --iterations given by name wins over a file's epochs
    assert load_config("instruction_following", {"iterations": 3}).task.epochs is None
    assert load_config("instruction_following").task.epochs == 6


def test_the_presets_follow_the_reference_scripts():
    ifp = load_config("instruction_following")
    h = ifp.hindsight
    assert (h.template, h.chat_template, h.temperature, h.skip_looping, h.max_train_prompt_tokens) == (
        "reference", False, 1.0, True, 6144)
    assert (ifp.task.epochs, ifp.task.max_prompt_tokens) == (6, 6144)
    med = load_config("medical")
    assert (med.task.epochs, med.task.max_prompt_tokens, med.hindsight.max_train_prompt_tokens) == (3, 4096, 4096)
    assert med.grade.judge.template == "reference" and med.hindsight.skip_looping is False


def test_the_reference_judge_wording():
    from herl.grading.judge import REFERENCE_SYSTEM, JudgeTask, build_judge_prompt, judge_system

    task = JudgeTask("[user]\nWhat helps a cough?", "Rest and fluids.", ("Mentions rest", "Says see a doctor"),
                     (5.0, -2.0), question="What helps a cough?")
    text = build_judge_prompt(task, "reference")
    assert text.startswith("Evaluate the response against each rubric independently.")
    assert "<prompt>\nWhat helps a cough?\n</prompt>" in text and "[user]" not in text
    assert "1. Mentions rest (weight: 5)\n2. Says see a doctor (weight: -2)" in text
    assert text.endswith('Return only JSON: {"results": [0 or 1, ...]}')
    assert judge_system("reference") == REFERENCE_SYSTEM and judge_system("herl") is None
    assert "[user]\nWhat helps a cough?" in build_judge_prompt(task)  # herl's shows the conversation


def test_the_dr_grpo_mode_and_its_old_name():
    assert load_config(None, {"train.loss_aggregation": "dr_grpo"}).train.loss_aggregation == "dr_grpo"
    assert load_config(None, {"train.loss_aggregation": "seq_mean_token_sum_norm"}).train.loss_aggregation == "dr_grpo"
