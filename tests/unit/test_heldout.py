"""The held-out evaluation inside a training run: the split, the schedule, the tables,
and resume (an evaluation setting redoes only the evaluations)."""

from __future__ import annotations

import pytest

from herl.data.pool import builtin_toy, split_pool
from herl.runs.query import query_run
from herl.runs.rundir import load_run, open_run
from herl.runs.status import stage_status
from schemas.config import ConfigError, load_config
from schemas.tables import read_table
from stages import run_iteration
from tests.helpers import small_overrides


def run_all(run) -> dict[tuple[int, str], bool]:
    """Every stage of the run's plan, as the flow runs them; returns {(k, stage): skipped}."""
    return {(k, stage): m["skipped"] for k in range(run.cfg.iterations + 1)
            for stage, m in run_iteration(run, k).items()}


def test_split_is_seeded_disjoint_and_order_free():
    pool = builtin_toy(20, seed=3)
    train_part, held = split_pool(pool, 5, seed=3)
    assert len(held) == 5 and len(train_part) == 15
    assert not {p["prompt_id"] for p in held} & {p["prompt_id"] for p in train_part}
    again_train, again_held = split_pool(list(reversed(pool)), 5, seed=3)
    assert {p["prompt_id"] for p in again_held} == {p["prompt_id"] for p in held}
    assert {p["prompt_id"] for p in split_pool(pool, 5, seed=4)[1]} != {p["prompt_id"] for p in held}
    assert split_pool(pool, 0, seed=3) == (pool, [])
    with pytest.raises(ValueError, match="task.holdout = 20 leaves no training prompts"):
        split_pool(pool, 20, seed=3)


def test_schedule_and_config_errors(tmp_path):
    cfg = load_config(None, small_overrides(tmp_path, iterations=5, **{"task.holdout": 2, "evaluation.every": 2}))
    assert [k for k in range(7) if cfg.evaluation_due(k)] == [0, 2, 4, 5]
    assert cfg.iteration_stages(0)[0] == "heldout" and cfg.iteration_stages(1)[0] == "rollout"
    assert cfg.iteration_stages(5) == ["heldout"]
    off = load_config(None, small_overrides(tmp_path, iterations=5))
    assert not any(off.evaluation_due(k) for k in range(7))
    with pytest.raises(ConfigError, match="evaluation.every needs prompts to evaluate: set task.holdout"):
        load_config(None, small_overrides(tmp_path, **{"evaluation.every": 1}))
    with pytest.raises(ConfigError, match=r"task.holdout \(8\) must be smaller than task.num_prompts \(8\)"):
        load_config(None, small_overrides(tmp_path, **{"task.holdout": 8}))


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    cfg = load_config(None, small_overrides(tmp_path_factory.mktemp("runs"), run_id="ho", **{
        "task.num_prompts": 12, "task.holdout": 4, "evaluation.every": 1, "evaluation.rounds": 1}))
    run = open_run(cfg)
    run_all(run)
    return run


def test_heldout_tables_for_every_evaluated_policy(evaluated_run):
    run = evaluated_run
    held_ids = {p["prompt_id"] for p in split_pool(builtin_toy(12, run.cfg.seed), 4, run.cfg.seed)[1]}
    for k in (0, 1, 2):
        answers = read_table("heldout_answers", run.table(k, "heldout_answers")).to_pylist()
        assert {a["prompt_id"] for a in answers} == held_ids
        assert sorted({a["round"] for a in answers}) == [0, 1] and len(answers) == 8
        first = {a["prompt_id"]: a for a in answers if a["round"] == 0}
        # round 1 revises exactly the answers that did not meet every item in round 0
        assert {a["prompt_id"] for a in answers if a["revised"]} == \
            {p for p, a in first.items() if not a["all_met_strict"]}
        names = {m["name"] for m in read_table("heldout_metrics", run.table(k, "heldout_metrics")).to_pylist()}
        assert {"mean_reward_strict", "mean_reward_loose", "revised"} <= names
    # held-out prompts never reach training; iteration 2 only evaluates the final policy
    trained = {r[0] for r in query_run(run.path, "select distinct prompt_id from prompts").fetchall()}
    assert trained and not trained & held_ids
    assert not run.table(2, "rollouts").exists() and run.snapshot(2).exists()
    rows = query_run(run.path, """select iteration, value from metrics
                                  where stage = 'heldout' and name = 'final_mean_reward_strict' order by 1""").fetchall()
    assert [k for k, _ in rows] == [0, 1, 2] and all(0 <= v <= 1 for _, v in rows)
    status = {(r["iteration"], r["stage"]): r["status"] for r in stage_status(run.path)}
    assert status[(0, "heldout")] == status[(2, "heldout")] == "done"
    assert (2, "rollout") not in status and status[(1, "train")] == "done"


def test_evaluation_settings_redo_only_the_evaluations(evaluated_run):
    run = load_run(evaluated_run.path)
    assert all(run_all(run).values())
    run.cfg = run.cfg.model_copy(update={"evaluation": run.cfg.evaluation.model_copy(update={"rounds": 2})})
    redone = sorted(key for key, skipped in run_all(run).items() if not skipped)
    assert redone == [(0, "heldout"), (1, "heldout"), (2, "heldout")]
    answers = read_table("heldout_answers", run.table(2, "heldout_answers")).to_pylist()
    assert sorted({a["round"] for a in answers}) == [0, 1, 2]
