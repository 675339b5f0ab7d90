"""What a run holds: the status of every (iteration, stage) and its disk use (`herl status`)."""

from __future__ import annotations

from pathlib import Path

from herl.models.snapshot import snapshot_meta
from herl.runs.rundir import load_run
from schemas.config import stage_config_hash
from schemas.stages import STAGES


def stage_status(run_dir: str | Path) -> list[dict]:
    """One row per (iteration, stage): status done / failed / running / interrupted /
    corrupt (its manifest or outputs do not verify) / stale (done under another config:
    resume redoes it) / missing, rows, seconds."""
    run = load_run(run_dir)
    locked = run.is_locked()
    iters = sorted(int(p.name.split("-")[1]) for p in run.path.glob("iter-*") if p.name.split("-")[1].isdigit())
    n = max([run.cfg.iterations, *iters]) + 1
    rows = []
    for k in range(n):
        planned = run.cfg.iteration_stages(k)
        # stages of this config's plan, and any other stage that left a manifest (an earlier, longer run)
        for stage in planned + [s for s in ("heldout", *STAGES) if s not in planned and run.manifest_path(k, s).exists()]:
            m = run.read_manifest(k, stage)
            status = "missing" if m is None else m["status"]
            if status == "running" and not locked:
                status = "interrupted"
            problems = run.output_problems(k, stage, deep=False) if status == "done" else []
            if problems:  # marked done, but what it wrote is gone or damaged: redone on resume
                status, m = "corrupt", {**(m or {}), "error": "; ".join(problems) + "; `herl resume` redoes it"}
            elif status == "done" and m is not None and m.get("config_hash") != stage_config_hash(run.cfg, stage):
                # done under another config (config.json was edited, or herl's settings changed)
                status, m = "stale", {**m, "error": "the config it depends on changed since it ran; "
                                                    "`herl resume` redoes it (and what follows from it)"}
            out_rows = sum(o["rows"] for name, o in (m or {}).get("outputs", {}).items() if name != "metrics")
            rows.append({"iteration": k, "stage": stage, "status": status,
                         "rows": out_rows if status == "done" else None,
                         "seconds": m.get("seconds") if m else None, "attempts": m.get("attempts") if m else None,
                         "error": (m or {}).get("error", "")})
    return rows


def disk_line(run_dir: Path) -> str:
    """What the run holds on disk: snapshots (whole / weights only / pruned) and tables."""
    def size(paths) -> int:
        return sum(p.stat().st_size for p in paths if p.is_file())

    snaps = sorted((run_dir / "snapshots").glob("policy-*"))
    pruned = sum(bool(snapshot_meta(s).get("pruned")) for s in snaps)  # a LoRA snapshot has adapter weights only
    with_opt = sum((s / "optimizer.pt").exists() for s in snaps)
    snap_bytes = size(p for s in snaps for p in s.rglob("*"))
    table_bytes = size(run_dir.glob("iter-*/*.parquet"))
    return (f"disk: {human_bytes(snap_bytes + table_bytes)} ({human_bytes(snap_bytes)} in {len(snaps)} snapshots: "
            f"{len(snaps) - pruned} with weights, {with_opt} with optimizer state, {pruned} pruned; "
            f"{human_bytes(table_bytes)} of tables)")


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


MEMORY_PARTS = (("weights", "memory_weights_gb"), ("trainable", "memory_trainable_gb"),
                ("gradients", "memory_gradients_gb"), ("AdamW state", "memory_optimizer_gb"),
                ("KL reference", "memory_reference_gb"))


def memory_line(run_dir: Path) -> str | None:
    """What the trainer held at the newest train stage, part by part (its metrics
    memory_*_gb, per process), its peak resident and GPU memory, and where it keeps them
    between iterations; None before any train stage."""
    run = load_run(run_dir)
    trained = [k for k in range(run.cfg.iterations + 1) if run.table(k, "metrics", "train").exists()]
    if not trained:
        return None
    m = {name: v for _, name, v in run.metric_rows(trained[-1], ["train"])}
    if "memory_weights_gb" not in m:  # a run from an older herl
        return None
    parts = ", ".join(f"{label} {human_bytes(m[key] * 1e9)}" for label, key in MEMORY_PARTS if key in m)
    peaks = f"peak RSS {human_bytes(m.get('peak_rss_gb', 0.0) * 1e9)}" + (
        f", peak GPU {human_bytes(m['peak_gpu_memory_gb'] * 1e9)}" if "peak_gpu_memory_gb" in m else "")
    where: str = run.cfg.train.between_iterations
    where += " (offload on GPUs, keep on CPUs)" if where == "auto" else ""
    return f"trainer (iteration {trained[-1]}, per process): {parts}; {peaks}; between iterations: {where}"


def run_summary(run_dir: str | Path, wall_seconds: float | None = None) -> list[str]:
    """The lines `herl run` ends with: iterations done, mean reward first -> last, seconds
    per stage kind (summed over iterations), the engine used, and where to look next."""
    run = load_run(run_dir)
    rows = stage_status(run.path)
    done = [r for r in rows if r["status"] == "done"]
    trained = sorted({r["iteration"] for r in done if r["stage"] == "train"})
    rewards = {k: v for k in trained for stage, name, v in run.metric_rows(k, ["grade"]) if name == "mean_reward"}
    seconds: dict[str, float] = {}
    for r in done:
        seconds[r["stage"]] = seconds.get(r["stage"], 0.0) + (r["seconds"] or 0.0)
    in_stages = sum(seconds.values())
    lines = [f"{len(trained)} of {run.cfg.iterations} iterations done"
             + (f" (this command: {wall_seconds:.1f} s)" if wall_seconds is not None else "")]
    if rewards:
        first, last = min(rewards), max(rewards)
        lines.append(f"mean reward:  {rewards[first]:.3f} (iteration {first}) -> {rewards[last]:.3f} (iteration {last})")
    if seconds:
        order = [s for s in ("heldout", *STAGES) if s in seconds]
        lines.append(f"stage time:   {in_stages:.1f} s: " + ", ".join(f"{s} {seconds[s]:.1f} s" for s in order))
    engines = [dict((n, v) for _, n, v in run.metric_rows(k, ["rollout"])) for k in trained]
    if engines:
        startup = sum(e.get("engine_startup_seconds", 0.0) for e in engines)
        starts = sum(e.get("engine_startup_seconds", 0.0) > 0 for e in engines)
        kind = "vllm" if any(e.get("engine_vllm") for e in engines) else "transformers"
        lines.append(f"engine:       {kind} (rollout.engine = {run.cfg.rollout.engine})"
                     + (f", {starts} start-up(s), {startup:.1f} s" if starts else ""))
    path = run.path
    lines += [f"run folder:   {path}",
              f"look at it:   herl status {path}  |  herl view {path}  |  herl plot {path}  |  herl sql {path} \"...\""]
    if "tensorboard" in run.cfg.tracking.report_to:
        lines.append(f"tensorboard:  tensorboard --logdir {path / 'tracking' / 'tensorboard'}")
    return lines
