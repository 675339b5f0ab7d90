"""Time the embedded default run end to end and print stage timings and rewards.

    python benchmarks/default_run.py [--config FILE] [--runs-dir DIR] [--set KEY=VALUE ...]

Runs the `herl` flow in-process (as `herl run` does, Prefect's ephemeral API included),
then prints one row per iteration with each stage's seconds (from the stage manifests)
and the mean reward, the total wall time and where it went, and where the train
stages' time went (job start, model load, old-log-prob pass, optimizer steps, save, seal).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows import prefect_defaults  # noqa: E402
from herl.runs.query import query_run  # noqa: E402
from herl.runs.rundir import load_run  # noqa: E402
from schemas.config import parse_overrides  # noqa: E402
from schemas.stages import STAGES  # noqa: E402

# where a train stage's time goes, from its metrics (herl/training/trainer.py, stages/train.py)
TRAIN_PARTS = [
    ("job_overhead_seconds", "job start and exit (fork, imports, tear-down)"),
    ("load_seconds", "accelerate, model and optimizer state"),
    ("sequences_seconds", "the batch's token lists"),
    ("old_logprob_pass_seconds", "old log-prob pass"),
    ("optimizer_steps_seconds", "forward, backward, optimizer steps"),
    ("save_seconds", "saving the snapshot"),
    ("seal_seconds", "sealing it (file digests)"),
]


def train_breakdown(run, train_total: float) -> str:
    """A table of the train stages' time by part, summed over the run's iterations."""
    sums = dict.fromkeys([name for name, _ in TRAIN_PARTS], 0.0)
    for k in range(run.cfg.iterations):
        got = {n: v for _, n, v in run.metric_rows(k, ["train"])}
        for name in sums:
            sums[name] += got.get(name, 0.0)
    rows = [(what, sums[name]) for name, what in TRAIN_PARTS]
    rows.append(("the rest (engine rest, manifests, metrics table)", train_total - sum(sums.values())))
    lines = [f"| train stage, {run.cfg.iterations} iterations | seconds | share |", "|---|---|---|"]
    lines += [f"| {what} | {v:.2f} | {v / train_total:.0%} |" for what, v in rows]
    return "\n".join(lines + [f"| all | {train_total:.2f} | 100% |"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--runs-dir", default=None, help="default: a temporary folder")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    prefect_defaults()
    from flows.iterate import iterate

    runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="herl-bench-")
    t0 = time.perf_counter()
    path = iterate(config=args.config, runs_dir=runs_dir, run_id="bench", overrides=parse_overrides(args.set))
    wall = time.perf_counter() - t0
    run = load_run(path)

    rewards = dict(query_run(path, "SELECT iteration, avg(reward) FROM rewards GROUP BY 1").fetchall())
    header = f"| iter | {' | '.join(f'{s:>10}' for s in STAGES)} | {'total s':>8} | {'reward':>6} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    stage_total = {s: 0.0 for s in STAGES}
    for k in range(run.cfg.iterations):
        secs = [run.read_manifest(k, s)["seconds"] for s in STAGES]
        for s, v in zip(STAGES, secs):
            stage_total[s] += v
        print(f"| {k:>4} | {' | '.join(f'{v:>10.2f}' for v in secs)} | {sum(secs):>8.2f} | {rewards[k]:>6.3f} |")
    in_stages = sum(stage_total.values())
    print(f"| {'all':>4} | {' | '.join(f'{stage_total[s]:>10.2f}' for s in STAGES)} | {in_stages:>8.2f} |        |")
    print()
    print(f"wall time {wall:.1f} s: {in_stages:.1f} s in stages, {wall - in_stages:.1f} s Prefect start-up and overhead")
    print()
    print(train_breakdown(run, stage_total["train"]))
    first, last = rewards[0], rewards[run.cfg.iterations - 1]
    print(f"mean reward: first iteration {first:.3f}, last iteration {last:.3f} ({last - first:+.3f})")
    print(json.dumps({"wall_seconds": round(wall, 1), "stage_seconds": round(in_stages, 1),
                      "reward_first": round(first, 4), "reward_last": round(last, 4), "run_dir": str(path)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
