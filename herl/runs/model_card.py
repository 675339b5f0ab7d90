"""The model card (`README.md`) that `herl export` writes beside an exported policy: the run
id, the base model, how it was trained, the metrics of the iteration that made it (and of
its held-out evaluation, where there is one), and the whole config."""

from __future__ import annotations

import json

from herl.runs.rundir import Run


def model_card(run: Run, k: int) -> str:
    """The card of policy k of `run` (policy 0 is the base model; policy k > 0 is what
    iteration k-1's train stage wrote)."""
    cfg = run.cfg
    base = cfg.model.path
    hub_id = not base.startswith(("builtin:", "/", ".", "~")) and base.count("/") == 1
    made = run.metric_rows(k - 1) if k > 0 else []
    heldout = run.metric_rows(k, ["heldout"]) if "heldout" in cfg.iteration_stages(k) else []
    lines = ["---", "library_name: transformers", "tags:", "- herl", "- reinforcement-learning", "- rubric-rewards"]
    if hub_id:
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {run.run_id}: policy {k}", "",
              "Trained with herl (HeRL: reinforcement learning from rubric rewards, with failed answers "
              "and the rubric items they missed fed back as hindsight experience).", "",
              "| | |", "|---|---|",
              f"| run id | `{run.run_id}` |",
              f"| policy | {k} of {cfg.iterations} (after {k} training iterations) |",
              f"| base model | `{base}` |",
              f"| algorithm | `{cfg.algorithm}` |",
              f"| prompts | `{cfg.task.source}` ({cfg.task.prompts_per_iteration} per iteration, "
              f"{cfg.rollout.n} answers each) |",
              f"| LoRA | {'rank ' + str(cfg.train.lora.rank) + ', merged into the base' if cfg.train.lora.rank else 'no'} |",
              ""]
    if made:
        lines += [f"## Metrics of the iteration that made it (iteration {k - 1})", "",
                  "| stage | metric | value |", "|---|---|---|"]
        lines += [f"| {s} | {n} | {v:.4g} |" for s, n, v in made] + [""]
    if heldout:
        lines += ["## Held-out evaluation of this policy", "", "| metric | value |", "|---|---|"]
        lines += [f"| {n} | {v:.4g} |" for _, n, v in heldout] + [""]
    if not made and not heldout:
        lines += ["Policy 0 is the base model: no training metrics.", ""]
    lines += ["## Config", "", "```json", json.dumps(cfg.model_dump(mode="json"), indent=1), "```", ""]
    return "\n".join(lines)
