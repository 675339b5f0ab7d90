"""The stages of an iteration: one declaration each, and the plan of an iteration.

Everything that lists stages reads them here: the flow (flows/iterate.py), the run
directory (pruning, `herl status`), a manifest's config hash (schemas/config.py),
`stages.run_iteration` (the benchmarks and tests), so adding a stage is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    config: tuple[str, ...]
    """The config sections its output depends on: a change to one redoes it on resume."""
    module: str
    """The module whose `run(run, k)` runs it (`python -m <module> RUN_DIR -k K` alone)."""
    reads: tuple[str, ...]
    """Tables (and snapshots) it reads."""
    writes: tuple[str, ...]
    """Tables (and snapshots) it writes."""


TRAINING = (
    StageSpec("rollout", ("seed", "model", "task", "rollout", "vllm"), "stages.rollout",
              ("snapshot k", "task.source"), ("prompts", "rollouts")),
    StageSpec("grade", ("grade", "plugins"), "stages.grade", ("prompts", "rollouts"), ("verdicts", "rewards")),
    StageSpec("hindsight", ("seed", "algorithm", "rollout", "grade", "hindsight", "vllm", "plugins"),
              "stages.hindsight", ("prompts", "rollouts", "rewards", "verdicts", "snapshot k"),
              ("hindsight", "hindsight_verdicts")),
    StageSpec("advantages", ("seed", "algorithm", "rollout", "hindsight", "advantages"), "stages.advantages",
              ("rollouts", "rewards", "hindsight"), ("batch",)),
    StageSpec("train", ("seed", "model", "train", "rollout", "hindsight"), "stages.train",
              ("batch", "rollouts", "hindsight", "snapshot k"), ("snapshot k+1",)),
)
"""The five stages of a training iteration, in order."""

HELDOUT = StageSpec("heldout", ("seed", "model", "task", "rollout", "grade", "hindsight", "evaluation", "vllm",
                                "plugins"), "stages.heldout", ("snapshot k", "task.source"),
                    ("heldout_answers", "heldout_metrics"))
"""The held-out evaluation of policy k, where cfg.evaluation makes it due."""

SPECS = {s.name: s for s in (HELDOUT, *TRAINING)}
STAGES = tuple(s.name for s in TRAINING)
