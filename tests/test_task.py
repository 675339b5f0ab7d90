"""Config validation, table contracts and atomic writes, prompts-file errors, sampling."""

from __future__ import annotations

from herl.data.pool import builtin_toy, sample_for_iteration


def test_builtin_task_and_epoch_sampling():
    pool = builtin_toy(10, 0)
    assert pool == builtin_toy(10, 0) and pool != builtin_toy(10, 1)
    assert all(3 <= len(p["rubric"]) <= 5 for p in pool)
    seen = [p["prompt_id"] for k in range(5) for p in sample_for_iteration(pool, k, 2, 0)]
    assert sorted(seen) == sorted(p["prompt_id"] for p in pool)  # one epoch = every prompt once
    assert len(sample_for_iteration(pool, 0, 25, 0)) == 10  # no duplicates inside one iteration
