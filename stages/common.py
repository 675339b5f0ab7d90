"""Helpers every stage shares: metrics rows and the `python -m stages.<name>` entry point."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from herl.runs.rundir import Run, load_run
from schemas.tables import write_table


def write_metrics(run: Run, k: int, stage: str, values: dict[str, float]) -> tuple[Path, int]:
    """Write this stage's metrics table (one row per name) and return (path, rows)."""
    path = run.table(k, "metrics", stage)
    rows = [{"run_id": run.run_id, "iteration": k, "stage": stage, "name": name, "value": float(v)}
            for name, v in sorted(values.items())]
    return path, write_table("metrics", rows, path)


def stage_main(name: str, run_fn: Callable[[Run, int], dict], argv: list[str] | None = None) -> int:
    """`python -m stages.<name> RUN_DIR --iteration K`: run one stage alone, without Prefect."""
    ap = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=f"Run the {name} stage of one iteration.")
    ap.add_argument("run_dir", type=Path, help="run directory (runs/<run_id>), made by `herl run`")
    ap.add_argument("--iteration", "-k", type=int, required=True, help="iteration number, from 0")
    args = ap.parse_args(argv)
    manifest = run_fn(load_run(args.run_dir), args.iteration)
    json.dump({k: manifest.get(k) for k in ("stage", "iteration", "status", "skipped", "seconds", "outputs")},
              sys.stdout, indent=2)
    print()
    return 0
