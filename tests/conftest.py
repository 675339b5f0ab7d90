from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT.parent / "shared" / "benchmarks"


@pytest.fixture(scope="session", autouse=True)
def _isolated_homes(tmp_path_factory):
    """Keep the tiny model cache and Prefect's state out of the user's home."""
    home = tmp_path_factory.mktemp("homes")
    os.environ.setdefault("HERL_HOME", str(home / "herl"))
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    yield


def small_overrides(runs_dir: Path, run_id: str = "t", **extra) -> dict:
    """A config small enough for a whole iteration in a few seconds on a CPU."""
    return {
        "run_id": run_id, "runs_dir": str(runs_dir), "iterations": 2,
        "task.num_prompts": 8, "task.prompts_per_iteration": 4,
        "rollout.engine": "transformers", "rollout.n": 4, "rollout.max_tokens": 8, "hindsight.max_tokens": 8, "hindsight.candidate_limit": 2,
        "train.micro_batch_size": 16, "train.mini_batches": 2, **extra,
    }
