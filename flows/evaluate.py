"""The Prefect flow `herl-eval`: test-time self-improvement on a prompts file.

Orchestration only: one task runs stages.evaluate, and the per-round scores are
published as a markdown artifact. Run in-process by `herl eval`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from schemas.config import load_config
from stages import evaluate as evaluate_stage


@task(cache_policy=NO_CACHE, name="evaluate")
def evaluate_task(prompts: str, model: str, out: str, rounds: int, limit: int | None, config: str | None,
                  overrides: dict[str, Any] | None) -> dict:
    cfg = load_config(config, overrides)
    return evaluate_stage.run(prompts, model, out, rounds, limit, cfg)


@flow(name="herl-eval", log_prints=True)
def evaluate(prompts: str, model: str = "builtin:tiny", out: str = "evals/latest", rounds: int = 2,
             limit: int | None = None, config: str | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Answer, grade and revise `prompts` for `rounds` rounds with `model`; returns {round: metrics}."""
    summary = evaluate_task(prompts, model, out, rounds, limit, config, overrides)
    key = "herl-eval-" + "".join(c if c.isalnum() else "-" for c in str(out).lower()).strip("-")[-60:]
    create_markdown_artifact(key=key, markdown=f"# herl eval: {prompts}\n\n" + evaluate_stage.metrics_markdown(summary),
                             description=f"herl eval of {model} on {prompts}")
    return summary
