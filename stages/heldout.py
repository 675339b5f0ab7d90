"""Held-out stage: test-time self-improvement of policy k on prompts it never trains on.

The pool's held-out prompts (task.holdout, a seeded choice the rollout stage leaves out),
or the prompts of evaluation.source (say IFEval's, never trained on), at most
evaluation.limit of them (a seeded subset), are answered by snapshot k, graded, and
revised for evaluation.rounds rounds from the grader's verdicts, exactly as `herl eval` does (herl.evaluation.job.self_improve). The flow
runs it where `evaluation_due(k)`: policies 0, every, 2*every, ... and the final policy
(k = iterations, whose iter-k folder holds only this stage).

Reads:  the prompt pool (task.source) or evaluation.source, snapshot k
Writes: iter-k/heldout_answers.parquet  one row per (round, held-out prompt)
        iter-k/heldout_metrics.parquet  one row per (round, metric)
        iter-k/metrics-heldout.parquet  first and last round's scores, for the run's metrics
Alone:  python -m stages.heldout runs/<run_id> --iteration K
"""

from __future__ import annotations

from pathlib import Path

from herl.data.importers import source_path
from herl.data.pool import evaluation_prompts
from herl.evaluation.self_improve import self_improve
from herl.runs.rundir import Run
from schemas.tables import write_table
from stages.common import stage_main, write_metrics

STAGE = "heldout"


def run(run: Run, k: int) -> dict:
    cfg = run.cfg
    ev = cfg.evaluation
    inputs = {"snapshot": run.snapshot(k)}
    if ev.source is not None:
        inputs["evaluation"] = source_path(ev.source)
    elif not cfg.task.source.startswith("builtin:"):
        inputs["task"] = Path(cfg.task.source)

    def body():
        held = evaluation_prompts(cfg)
        if not held:
            raise ValueError("the held-out evaluation needs prompts: set task.holdout >= 1 or evaluation.source")
        answers, metrics, summary = self_improve(
            held, inputs["snapshot"], cfg, ev.rounds, ev.temperature, ev.max_tokens or cfg.rollout.max_tokens,
            run.judge_cache, seed_tag=f"heldout:{k}", shared=run.path)
        ids = {"run_id": run.run_id, "iteration": k}
        paths = {name: run.table(k, name) for name in ("heldout_answers", "heldout_metrics")}
        out = {
            "heldout_answers": (paths["heldout_answers"], write_table(
                "heldout_answers", [{**ids, **r} for r in answers], paths["heldout_answers"])),
            "heldout_metrics": (paths["heldout_metrics"], write_table(
                "heldout_metrics", [{**ids, **r} for r in metrics], paths["heldout_metrics"])),
        }
        last = max(summary)
        out["metrics"] = write_metrics(run, k, STAGE, {
            "prompts": len(held),
            **{f"round0_{name}": v for name, v in summary[0].items() if name != "revised"},
            **{f"final_{name}": v for name, v in summary[last].items() if name != "revised"},
            "rounds": last,
        })
        return out

    return run.run_stage(k, STAGE, inputs, body)


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE, run))
