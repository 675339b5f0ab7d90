"""Train stage: one policy update on the iteration's batch; saves the next snapshot.

docs/algorithm.md step 9. The update itself is a job of its own (herl/training/trainer.py) that
this stage starts with `accelerate launch` (train.launcher: processes, machines, an
accelerate config for FSDP or DeepSpeed) in its own process group, and waits for: its
memory is freed when it ends, and a killed job leaves no snapshot, so the stage is redone.
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
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from herl.generation.engines import rest_engines
from herl.models.snapshot import SnapshotPrunedError, seal_snapshot, snapshot_meta
from herl.runs.rundir import Run
from herl.training.trainer import (
    DISK_FULL_EXIT,
    ERROR_FILE,
    METRICS_FILE,
    NONFINITE_EXIT,
    precision_warning,
)
from herl.util.procs import raise_if_stop_requested
from schemas.config import HerlConfig, stage_config_hash
from schemas.errors import UserError, no_space, out_of_space
from schemas.tables import atomic_directory
from stages.common import stage_main, write_metrics

STAGE = "train"
STOP_GRACE_S = 30.0  # how long a training job asked to stop may take before it is killed


class TrainJobError(UserError, RuntimeError):
    """The training job exited with an error (its own output says why)."""


class TrainDivergedError(UserError, RuntimeError):
    """The update made the loss, gradients or weights non-finite; nothing was saved."""


def launch_command(cfg: HerlConfig, run_dir: Path, k: int, out_dir: Path) -> list[str] | None:
    """`accelerate launch ... -m herl.training.trainer RUN_DIR K OUT_DIR` from train.launcher; None
    for one process on one machine without an accelerate config, which runs as a child
    forked from a warm server (start_job) instead of paying 10 s of imports."""
    lc, t = cfg.train.launcher, cfg.train
    if lc.num_processes == 1 and lc.num_machines == 1 and not lc.accelerate_config:
        return None
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if lc.accelerate_config:
        cmd += ["--config_file", str(Path(lc.accelerate_config).resolve())]
    cmd += ["--num_processes", str(lc.num_processes), "--num_machines", str(lc.num_machines),
            "--mixed_precision", t.mixed_precision, "--dynamo_backend", "no"]
    if lc.num_machines > 1:
        cmd += ["--machine_rank", str(lc.machine_rank), "--main_process_ip", str(lc.main_process_ip)]
    if lc.main_process_port:
        cmd += ["--main_process_port", str(lc.main_process_port)]
    if not lc.accelerate_config:
        # torchrun underneath; without GPUs the processes talk over gloo (accelerate's
        # --cpu would start one process only)
        cmd += ["--multi_gpu"]
    return cmd + _job_args(run_dir, k, out_dir)


def _job_args(run_dir: Path, k: int, out_dir: Path) -> list[str]:
    return ["-m", "herl.training.trainer", str(run_dir), str(k), str(out_dir)]


class _ForkedJob:
    """One training process forked from multiprocessing's fork server, which imported
    torch, transformers and herl.training.trainer once: what `accelerate launch` runs for one
    process (a plain child), without its start-up."""

    def __init__(self, run_dir: Path, k: int, out_dir: Path):
        import multiprocessing

        from herl.training.trainer import run_job
        from herl.util.progress import enabled

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["herl.training.trainer", "transformers.modeling_utils", "accelerate"])
        # the fork server may have started before this process's HERL_PROGRESS was set: the
        # progress choice travels with the job
        self.proc = ctx.Process(target=run_job, args=(str(run_dir), k, str(out_dir), enabled()),
                                name=f"herl-train-{k}")
        self.proc.start()
        self.pid = self.proc.pid

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired("herl.training.trainer", timeout or 0.0)
        return self.proc.exitcode


def start_job(cfg: HerlConfig, run_dir: Path, k: int, out_dir: Path):
    """Start the training job in its own process group; returns it (pid, wait) and its description."""
    import multiprocessing

    cmd = launch_command(cfg, run_dir, k, out_dir)
    if cmd is None and not multiprocessing.current_process().daemon:
        return _ForkedJob(run_dir, k, out_dir), f"herl.training.trainer {run_dir} {k} (one process)"
    if cmd is None:  # a daemonic pool worker may not fork children: a fresh interpreter instead
        cmd = [sys.executable, *_job_args(run_dir, k, out_dir)]
    # its own process group, so that stopping the stage stops every process it started
    return subprocess.Popen(cmd, start_new_session=True, env=launch_env(cfg)), " ".join(cmd[1:])


def launch_env(cfg: HerlConfig) -> dict[str, str]:
    """The job's environment: this checkout importable, and on CPUs the cores shared out."""
    env = {**os.environ, "PYTHONPATH": _pythonpath()}
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.train.launcher.num_processes)))
    return env


def _wait(proc, timeout_s: float | None) -> int:
    """Wait for the job; on any exit from here (error, SIGTERM, timeout) stop its whole group."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                raise_if_stop_requested()  # a stop signal whose exception was dropped
                if deadline is not None and time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired("herl.training.trainer", timeout_s or 0.0) from None
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:  # not yet in its own group
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise


def train_memory_bytes(base: Path, t) -> int:
    """A rough bound on the memory a train job needs beside the engine: float32 weights,
    gradients and two AdamW moments (4x the model's weights; with LoRA about the frozen
    weights once) and 1 GiB for activations and libraries."""
    weights = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
    return (weights if t.lora.rank else 4 * weights) + (1 << 30)


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
        rest_engines(cfg.vllm.between_iterations, train_memory_bytes(run.snapshot(0), cfg.train))
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
            job, what = start_job(cfg, run.path.resolve(), k, tmp)
            rc = _wait(job, cfg.train.launcher.timeout_s)
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


def _pythonpath() -> str:
    # the job imports herl, stages' schemas etc. from this checkout even when it is not installed
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])


if __name__ == "__main__":
    raise SystemExit(stage_main(STAGE, run))
