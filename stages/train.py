"""Train stage: one policy update on the iteration's batch; saves the next snapshot.

docs/algorithm.md step 9. The update itself runs in a job of its own (herl/training/trainer.py,
started through herl/training/launcher.py: a fork from a warm server, or `accelerate
launch` with train.launcher's processes, machines and config) in its own process group.
With train.between_iterations = keep / offload (auto) that job is the run's resident
trainer (herl/trainer_service), started at the first train stage and handed each
iteration after; with exit it is a job per iteration. A killed job leaves no snapshot, so
the stage is redone (from snapshot k on disk, by a new trainer).
The job writes the snapshot's files into a temporary folder beside its final place; this
stage seals it (file digests) and renames it into place.

Reads:  iter-k/batch.parquet (token lists from iter-k/rollouts and hindsight), snapshot k (and snapshot 0: the KL reference, or the LoRA base)
Writes: snapshots/policy-<k+1>/  (HF layout or a LoRA adapter, safetensors, tokenizer,
                                   optimizer.pt, herl_snapshot.json), atomically
        iter-k/metrics-train.parquet
Alone:  python -m stages.train runs/<run_id> --iteration K
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings

from herl.generation.engines import rest_engines
from herl.models.snapshot import SnapshotPrunedError, seal_snapshot, snapshot_meta
from herl.runs.rundir import Run
from herl.trainer_service.client import live_trainer, resident_trainer
from herl.training.launcher import start_job, train_memory_bytes, wait_for_job
from herl.training.trainer import (
    DISK_FULL_EXIT,
    ERROR_FILE,
    METRICS_FILE,
    NONFINITE_EXIT,
    precision_warning,
)
from schemas.config import stage_config_hash
from schemas.errors import UserError, no_space, out_of_space
from schemas.tables import atomic_directory
from stages.common import stage_main, write_metrics

STAGE = "train"


def between_iterations(cfg) -> str:
    """train.between_iterations resolved: auto is offload on GPUs, keep on CPUs."""
    mode = cfg.train.between_iterations
    if mode != "auto":
        return mode
    import torch

    return "offload" if torch.cuda.is_available() else "keep"


class TrainJobError(UserError, RuntimeError):
    """The training job exited with an error (its own output says why)."""


class TrainDivergedError(UserError, RuntimeError):
    """The update made the loss, gradients or weights non-finite; nothing was saved."""


def run(run: Run, k: int) -> dict:
    cfg = run.cfg
    # the batch names its sequences; their token lists are in rollouts and hindsight
    inputs = {**{n: run.table(k, n) for n in ("batch", "rollouts", "hindsight")}, "snapshot": run.snapshot(k)}
    if cfg.train.kl_coef > 0 or cfg.train.lora.rank:  # the KL reference, or the base the adapter is on
        inputs["reference"] = run.snapshot(0)
    out_dir = run.snapshot(k + 1)

    def body():
        # generation is over for this iteration: the engine sleeps, or is kept where the
        # memory allows (the next rollout loads the new weights into it)
        resident = between_iterations(cfg) != "exit"
        # a live resident trainer already holds its memory: nothing more is needed for it
        rest_engines(cfg.vllm.between_iterations,
                     0 if resident and live_trainer() is not None else train_memory_bytes(run.snapshot(0), cfg.train))
        opt_state = inputs["snapshot"] / "optimizer.pt"
        if not opt_state.exists() and snapshot_meta(inputs["snapshot"]).get("optimizer_pruned"):
            # redoing this step without the AdamW moments would silently train another policy
            raise SnapshotPrunedError(
                f"iteration {k} train must be redone, but {opt_state} was pruned (only the newest snapshot keeps "
                "its optimizer state); restore it, or continue from a later snapshot")
        if (warning := precision_warning(cfg.train)) is not None:
            warnings.warn(warning, stacklevel=1)
        with atomic_directory(out_dir) as tmp:  # the job writes into tmp; renamed into place when sealed
            t_job = time.perf_counter()
            started = True
            if resident:  # the run's trainer: started at the first train stage, kept after
                trainer, started = resident_trainer(cfg, run.path.resolve())
                what = trainer.what
                rc = trainer.train(k, tmp, cfg.train.launcher.timeout_s)
            else:  # a job for this iteration alone
                job, what = start_job(cfg, run.path.resolve(), k, tmp)
                rc = wait_for_job(job, cfg.train.launcher.timeout_s)
            job_seconds = time.perf_counter() - t_job
            if rc == DISK_FULL_EXIT or (rc != 0 and out_of_space(tmp)):
                raise no_space(out_dir)
            if rc == NONFINITE_EXIT and (tmp / ERROR_FILE).exists():
                raise TrainDivergedError((tmp / ERROR_FILE).read_text())
            if rc != 0 or not (tmp / METRICS_FILE).exists():
                raise TrainJobError(f"iteration {k}: the training job ({what}) exited with code {rc}; "
                                    "its output above says why")
            metrics = json.loads((tmp / METRICS_FILE).read_text())
            (tmp / METRICS_FILE).unlink()
            # the job's start and exit (fork or launch, imports, tearing down): its wall time
            # less what it measured of itself
            metrics["job_overhead_seconds"] = job_seconds - metrics["seconds"]
            metrics["trainer_started"] = float(started)  # 0: the resident trainer served it
            t_seal = time.perf_counter()
            snapshot_id = hashlib.sha256(json.dumps(
                [run.run_id, k, stage_config_hash(cfg, STAGE), {n: p.name for n, p in inputs.items()},
                 metrics["loss"]], sort_keys=True).encode()).hexdigest()[:16]
            seal_snapshot(tmp, {"snapshot_id": f"{run.run_id}/policy-{k + 1}/{snapshot_id}",
                                "parent": str(inputs["snapshot"]), "iteration": k,
                                **({"base": str(run.snapshot(0)), "lora": True} if cfg.train.lora.rank else {})})
            metrics["seal_seconds"] = time.perf_counter() - t_seal
        return {"snapshot": (out_dir, metrics["sequences"]), "metrics": write_metrics(run, k, STAGE, metrics)}

    manifest = run.run_stage(k, STAGE, inputs, body)
    with run.lock():  # after the manifest: a kill before this leaves more on disk, never less
        freed = run.prune_snapshots(k)
    return {**manifest, "pruned_bytes": freed}


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE, run))
