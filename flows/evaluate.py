"""The Prefect flow `herl-eval`: test-time self-improvement on a prompts file.

Orchestration only: one task runs herl.evaluation.job, and the per-round scores are
published as a markdown artifact. Run in-process by `herl eval`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows import artifact_key, ensure_crash_automation
from herl.evaluation import job as eval_job
from schemas.config import load_config


@task(cache_policy=NO_CACHE, name="evaluate")
def evaluate_task(prompts: str, model: str, out: str, rounds: int, limit: int | None, config: str | None,
                  overrides: dict[str, Any] | None) -> dict:
    cfg = load_config(config, overrides)
    return eval_job.run(Path(prompts), model, Path(out), rounds, limit, cfg)


@flow(name="herl-eval", log_prints=True)
def evaluate(prompts: str, model: str = "builtin:tiny", out: str = "evals/latest", rounds: int = 2,
             limit: int | None = None, config: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Answer, grade and revise `prompts` for `rounds` rounds with `model`; returns {round: metrics}."""
    ensure_crash_automation()  # on a server of one's own: a killed run ends Crashed, not Running
    summary = evaluate_task(prompts, model, out, rounds, limit, config, overrides)
    create_markdown_artifact(key=artifact_key("herl-eval", str(out)[-60:]), markdown=f"# herl eval: {prompts}\n\n" + eval_job.metrics_markdown(summary),
                             description=f"herl eval of {model} on {prompts}")
    return summary
