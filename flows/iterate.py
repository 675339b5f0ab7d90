"""The Prefect flow `herl`: N iterations of rollout -> grade -> hindsight -> advantages -> train.

With evaluation.every > 0 the held-out evaluation of policy k opens iteration k where it
is due, and the final policy is evaluated after the last iteration (schemas/stages.py).

Orchestration only: every stage is a task that calls the stage module's `run`, which
skips itself when its manifest is current, so re-running a run (same run id) resumes
it. Each iteration publishes a markdown artifact with its metrics.

Deployed as `herl/iterate` by prefect.yaml; run in-process by `herl run`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from flows import artifact_key, ensure_crash_automation, flow_overrides, hide_user_error_tracebacks
from herl.cluster.ray_backend import connect
from herl.data.pool import check_pool_fits, with_planned_iterations
from herl.generation.engines import release_engines
from herl.runs.plot import plot_run
from herl.runs.rundir import Run, load_run, open_run
from herl.runs.tracking import check_trackers, sync_trackers
from herl.util.procs import raise_if_stop_requested
from schemas.config import load_config
from stages import run_named_stage
from stages.train import release_trainer


def run_eta(k: int, iterations: int, done: int, planned: int, seconds: float) -> str:
    """The run's progress line after iteration k: stages done, seconds so far and, at the
    rate so far (finished stages skipped on resume count as done), about how many are left."""
    left = seconds * (planned - done) / done if done else 0.0
    return (f"iteration {k} of {iterations} done: {done}/{planned} stages, {seconds:.0f} s"
            + (f", about {left:.0f} s left" if done < planned else ""))


@task(cache_policy=NO_CACHE, task_run_name="{stage}-{iteration}")
def run_stage(run_dir: str, stage: str, iteration: int) -> dict:
    """One stage of one iteration; returns its manifest summary (paths, not tables)."""
    m = run_named_stage(stage, load_run(run_dir), iteration)
    get_run_logger().info("%s iteration %d: %s%s (%.1f s)", stage, iteration, m["status"],
                          " (skipped: manifest current)" if m["skipped"] else "", m.get("seconds", 0.0))
    return {k: m.get(k) for k in ("stage", "iteration", "status", "skipped", "seconds", "outputs")}


def metrics_rows(run: Run, k: int) -> list[dict]:
    """Iteration k's metrics: one {stage, metric, value} per metric of each stage."""
    # four significant digits: what a table in the UI can show (the tables hold the rest)
    return [{"stage": s, "metric": n, "value": float(f"{v:.4g}")} for s, n, v in run.metric_rows(k)]


def metrics_markdown(run: Run, k: int) -> str:
    lines = [f"# herl run `{run.run_id}`, iteration {k}", "", "| stage | metric | value |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['metric']} | {r['value']:.4g} |" for r in metrics_rows(run, k)]
    return "\n".join(lines)


def publish_plot(run: Run, k: int, logger) -> None:
    """The run's curves so far as one artifact (key herl-<run>-plot, a new version each
    iteration): the PNG inline, and where it lies. A plot that fails costs a warning."""
    import base64

    try:
        png = plot_run(run.path)
    except Exception as exc:  # noqa: BLE001 (drawing must not stop training)
        logger.warning("plot: %s: %s", type(exc).__name__, exc)
        return
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    create_markdown_artifact(key=artifact_key("herl", run.run_id, "plot"),
                             markdown=f"# herl run `{run.run_id}` after iteration {k}\n\n"
                                      f"![curves](data:image/png;base64,{data})\n\n`{png}` (`herl plot {run.path}`)",
                             description=f"herl {run.run_id} curves after iteration {k}")


@flow(name="herl", log_prints=True)
def iterate(config: str | None = None, run_id: str | None = None, iterations: int | None = None,
            model_path: str | None = None, runs_dir: str | None = None,
            overrides: dict[str, Any] | None = None, run_dir: str | None = None) -> str:
    """Run (or resume) a HeRL training run; returns the run directory.

    config: TOML config path (default: the embedded tiny preset); run_id: reuse an id to
    resume; iterations, model_path, runs_dir: common overrides; overrides: any dotted
    config keys, e.g. {"train.learning_rate": 1e-5, "algorithm": "grpo"}; run_dir: the
    folder of an existing run to resume (it may have been moved: its config's run_id
    stays its identity).
    """
    hide_user_error_tracebacks()  # also where a deployment's worker runs the flow
    ensure_crash_automation()  # on a server of one's own: a killed run ends Crashed, not Running
    cfg = load_config(config, flow_overrides(run_id, iterations, model_path, runs_dir, overrides))
    # a bad prompts file or a prompt the model cannot hold fails here, before the run folder exists
    training_prompts = check_pool_fits(cfg)
    cfg = with_planned_iterations(cfg, training_prompts)  # task.epochs -> iterations, saved with the run
    check_trackers(cfg)
    if cfg.cluster.backend == "ray":  # Ray installed and the cluster answering, before the run folder is made
        connect(cfg.cluster.address)
    run = open_run(cfg, Path(run_dir) if run_dir else None)
    logger = get_run_logger()
    logger.info("run directory: %s", run.path)
    # first in the UI's artifacts: where the run lives and how to look at it from a shell
    create_markdown_artifact(key=artifact_key("herl", run.run_id, "run"),
                             markdown=f"# herl run `{run.run_id}`\n\nrun folder: `{run.path}`\n\n"
                                      f"```\nherl status {run.path}\nherl view {run.path}\n"
                                      f"herl sql {run.path} \"SELECT iteration, avg(reward) FROM rewards GROUP BY 1\"\n```",
                             description=f"herl {run.run_id}: run folder {run.path}")
    # held for the whole flow: a second writer fails at once; the stages of an iteration
    # that generate share one engine, which closes before train and at the end
    with run.lock():
        try:
            plan = [(k, stage) for k in range(cfg.iterations + 1) for stage in cfg.iteration_stages(k)]
            progress: Any = create_progress_artifact(0.0, key=artifact_key("herl", run.run_id, "progress"),
                                                description=f"herl {run.run_id}: stages done of {len(plan)}")
            done, last = 0, plan[-1][0]  # plot.png is drawn for the last planned iteration
            t_run = time.perf_counter()
            for k in range(cfg.iterations + 1):
                stages = cfg.iteration_stages(k)
                for stage in stages:
                    run_stage.with_options(retries=cfg.stage_retries)(str(run.path), stage, k)
                    raise_if_stop_requested()  # a stop signal whose exception was dropped
                    done += 1
                    update_progress_artifact(progress, 100.0 * done / len(plan))
                if not stages:
                    continue
                logger.info("%s", run_eta(k, cfg.iterations, done, len(plan), time.perf_counter() - t_run))
                create_markdown_artifact(key=artifact_key("herl", run.run_id, f"iter-{k}"), markdown=metrics_markdown(run, k),
                                         description=f"herl {run.run_id} iteration {k} metrics")
                create_table_artifact(key=artifact_key("herl", run.run_id, f"iter-{k}-table"),
                                      table=metrics_rows(run, k), description=f"herl {run.run_id} iteration {k} metrics")
                sync_trackers(run, k, logger)
                every = cfg.tracking.plot_every
                # each redraw reads the whole run: seconds that grow with it
                if k == last or (every and (k + 1) % every == 0):
                    publish_plot(run, k, logger)
        finally:
            release_trainer(run)  # its deferred optimizer write finished, then the pruning that waited for it
            release_engines()
    return str(run.path)
