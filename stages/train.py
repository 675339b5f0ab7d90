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
import os
import shutil
import time
import warnings

from herl.generation.engines import rest_engines
from herl.models.snapshot import (
    OPTIMIZER_FILE,
    OPTIMIZER_PARTIAL,
    SnapshotPrunedError,
    optimizer_unsealed,
    seal_optimizer,
    seal_snapshot,
    snapshot_meta,
)
from herl.runs.rundir import Run
from herl.trainer_service.client import live_trainer, release_trainers, resident_trainer
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
from schemas.tables import atomic_directory, file_sha256
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


def train_into(run: Run, k: int, out_dir, trainer, final_dir=None) -> tuple[int, str]:
    """Run iteration k's update into out_dir: by the resident trainer (final_dir: the
    optimizer state is deferred until the snapshot is sealed there) or a job of its own;
    returns (exit code, what ran)."""
    cfg = run.cfg
    if trainer is not None:
        return trainer.train(k, out_dir, cfg.train.launcher.timeout_s, final_dir=final_dir), trainer.what
    job, what = start_job(cfg, run.path.resolve(), k, out_dir)
    return wait_for_job(job, cfg.train.launcher.timeout_s), what


def _job_metrics(k: int, rc: int, what: str, tmp, out_dir) -> dict:
    """The update's metrics from what the job left in tmp, or the error its exit code means."""
    if rc == DISK_FULL_EXIT or (rc != 0 and out_of_space(tmp)):
        raise no_space(out_dir)
    if rc == NONFINITE_EXIT and (tmp / ERROR_FILE).exists():
        raise TrainDivergedError((tmp / ERROR_FILE).read_text())
    if rc != 0 or not (tmp / METRICS_FILE).exists():
        raise TrainJobError(f"iteration {k}: the training job ({what}) exited with code {rc}; "
                            "its output above says why")
    return json.loads((tmp / METRICS_FILE).read_text())


class OptimizerRedoMismatch(UserError, RuntimeError):
    """Redoing an update to recover its deferred optimizer state gave other weights."""


def complete_optimizer(run: Run, k: int, trainer) -> float:
    """Make snapshot k's optimizer state whole when its writer (the resident trainer) was
    stopped before sealing it: redo iteration k - 1's update from snapshot k - 1 (which
    keeps its own state until then: Run.prune_snapshots), check that it gives snapshot k's
    sealed weights bit for bit, and seal its optimizer state into snapshot k. Returns the
    seconds it took (0: nothing to do). A live trainer holding snapshot k needs nothing:
    it wrote (or is writing) the state before it takes the next request."""
    snap = run.snapshot(k)
    if k == 0 or not optimizer_unsealed(snap) or (trainer is not None and trainer.holds == k):
        return 0.0
    t0 = time.perf_counter()
    prev = run.snapshot(k - 1)
    if snapshot_meta(prev).get("pruned") or (k > 1 and not (prev / OPTIMIZER_FILE).exists()):
        raise SnapshotPrunedError(
            f"{snap}'s optimizer state was never written (its trainer stopped first), and {prev}, the update "
            "that made it starts from, was pruned; restore it, or continue from a snapshot that has its state")
    print(f"herl: {snap}'s optimizer state was never written (its trainer stopped first); redoing iteration "
          f"{k - 1}'s update from {prev} to recover it", flush=True)
    scratch = snap.parent / f".{snap.name}.redo"  # a hidden name: a killed redo is removed under the run lock
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        rc, what = train_into(run, k - 1, scratch, trainer)
        _job_metrics(k - 1, rc, what, scratch, snap)
        recorded = snapshot_meta(snap).get("files", {})
        differ = [name for name, rec in recorded.items() if name != OPTIMIZER_FILE
                  and (not (scratch / name).is_file() or file_sha256(scratch / name) != rec["sha256"])]
        if differ:
            raise OptimizerRedoMismatch(
                f"{snap}'s optimizer state was never written (its trainer stopped first), and redoing iteration "
                f"{k - 1}'s update did not give its weights back ({', '.join(differ)} differ: kernels that are not "
                f"deterministic). Remove {snap} and resume: iteration {k - 1}'s update and everything after it "
                "are redone")
        os.replace(scratch / OPTIMIZER_FILE, snap / OPTIMIZER_FILE)
        seal_optimizer(snap)
        (snap / OPTIMIZER_PARTIAL).unlink(missing_ok=True)  # what the stopped writer left
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return time.perf_counter() - t0


def release_trainer(run: Run) -> int:
    """Stop the run's resident trainer, its deferred optimizer write finished first, then
    prune what waited for that write (the snapshot before the newest keeps its state until
    the newest's is sealed); returns the bytes freed. The end of a flow calls it."""
    release_trainers()
    saved = run.saved_snapshots()
    if not saved:
        return 0
    with run.lock():
        return run.prune_snapshots(saved[-1] - 1)


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
        # (on a Ray cluster the trainer ranks have bundles of their own: this machine's memory is not theirs)
        on_here = cfg.cluster.backend == "local" and not (resident and live_trainer() is not None)
        rest_engines(cfg.vllm.between_iterations, train_memory_bytes(run.snapshot(0), cfg.train) if on_here else 0)
        opt_state = inputs["snapshot"] / OPTIMIZER_FILE
        if not opt_state.exists() and snapshot_meta(inputs["snapshot"]).get("optimizer_pruned"):
            # redoing this step without the AdamW moments would silently train another policy
            raise SnapshotPrunedError(
                f"iteration {k} train must be redone, but {opt_state} was pruned (only the newest snapshot keeps "
                "its optimizer state); restore it, or continue from a later snapshot")
        if (warning := precision_warning(cfg.train)) is not None:
            warnings.warn(warning, stacklevel=1)
        trainer, started = resident_trainer(cfg, run.path.resolve()) if resident else (None, True)
        # snapshot k's optimizer state, deferred by a trainer that was stopped before writing it
        redo_seconds = complete_optimizer(run, k, trainer)
        sealed = False
        try:
            with atomic_directory(out_dir) as tmp:  # the job writes into tmp; renamed into place when sealed
                t_job = time.perf_counter()
                # the run's trainer (started at the first train stage, kept after) writes the
                # optimizer state once the snapshot is sealed in place, while the next rollout
                # runs; a job, and the run's last update (nothing runs after it), write it all now
                defer = trainer is not None and k < cfg.iterations - 1
                rc, what = train_into(run, k, tmp, trainer, final_dir=out_dir if defer else None)
                job_seconds = time.perf_counter() - t_job
                metrics = _job_metrics(k, rc, what, tmp, out_dir)
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
                                    **({"optimizer_deferred": True} if defer else {}),
                                    **({"base": str(run.snapshot(0)), "lora": True} if cfg.train.lora.rank else {})})
                metrics["seal_seconds"] = time.perf_counter() - t_seal
            metrics["optimizer_redo_seconds"] = redo_seconds
            sealed = True
        finally:
            if trainer is not None:  # it writes the optimizer state into the sealed snapshot, or forgets it
                trainer.settle(sealed)
        return {"snapshot": (out_dir, metrics["sequences"]), "metrics": write_metrics(run, k, STAGE, metrics)}

    manifest = run.run_stage(k, STAGE, inputs, body)
    with run.lock():  # after the manifest: a kill before this leaves more on disk, never less
        freed = run.prune_snapshots(k)
    return {**manifest, "pruned_bytes": freed}


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE, run))
