"""The prompt pool (herl/data/pool.py): the built-in task, sampling by epochs, a batch
larger than the pool said once before the run."""

from __future__ import annotations

from herl.data.pool import builtin_toy, sample_for_iteration


def test_builtin_task_and_epoch_sampling():
    pool = builtin_toy(10, 0)
    assert pool == builtin_toy(10, 0) and pool != builtin_toy(10, 1)
    assert all(3 <= len(p["rubric"]) <= 5 for p in pool)
    seen = [p["prompt_id"] for k in range(5) for p in sample_for_iteration(pool, k, 2, 0)]
    assert sorted(seen) == sorted(p["prompt_id"] for p in pool)  # one epoch = every prompt once
    assert len(sample_for_iteration(pool, 0, 25, 0)) == 10  # no duplicates inside one iteration


def test_a_batch_larger_than_the_pool_is_said_once_before_the_run(capsys):
    from herl.data.pool import check_pool_fits
    from schemas.config import load_config

    cfg = load_config(None, {"task.num_prompts": 6, "task.holdout": 2, "task.prompts_per_iteration": 8,
                             "train.mini_batches": 2})
    check_pool_fits(cfg)
    err = capsys.readouterr().err
    assert err.count("task.prompts_per_iteration = 8, but the training pool holds 4 prompts") == 1, err
    check_pool_fits(load_config(None, {"task.num_prompts": 6, "task.prompts_per_iteration": 4,
                                       "train.mini_batches": 2}))
    assert "prompts_per_iteration" not in capsys.readouterr().err
