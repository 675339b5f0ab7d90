"""The batch jobs of an iteration, one module each (declared in schemas/stages.py)."""

from __future__ import annotations

import importlib

from schemas.stages import SPECS


def run_named_stage(name: str, run, k: int) -> dict:
    """Run stage `name` of iteration k (skipped when its manifest is current); its manifest summary."""
    return importlib.import_module(SPECS[name].module).run(run, k)


def run_iteration(run, k: int) -> dict[str, dict]:
    """Every stage of iteration k's plan, in order, without Prefect: {stage: manifest summary}."""
    return {name: run_named_stage(name, run, k) for name in run.cfg.iteration_stages(k)}
