"""Starting and stopping the train job (herl/training/trainer.py) for the train stage.

One process on one machine without an accelerate config: a child forked from a warm
fork server (torch, transformers and the trainer imported once). Otherwise `accelerate
launch` with train.launcher's processes, machines and config. Either way the job runs in
its own process group, so stopping the stage (an error, SIGTERM, a timeout) stops it and
everything it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from herl.util.procs import raise_if_stop_requested
from schemas.config import HerlConfig

STOP_GRACE_S = 30.0  # how long a training job asked to stop may take before it is killed


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


def serve_command(cfg: HerlConfig, run_dir: Path, control: Path) -> list[str]:
    """The resident trainer's command (herl/trainer_service): `launch_command`'s, serving
    the run from the control folder instead of one iteration; a fresh interpreter for one
    process."""
    cmd = launch_command(cfg, run_dir, 0, control) or [sys.executable, *_job_args(run_dir, 0, control)]
    return cmd[:-5] + ["-m", "herl.trainer_service.server", str(run_dir), str(control)]


class ForkedJob:
    """One training process forked from multiprocessing's fork server, which imported
    torch, transformers and herl.training.trainer once: what `accelerate launch` runs for one
    process (a plain child), without its start-up. `target(*args, progress)` runs in it
    (the one-shot job's run_job, the resident trainer's serve_job); poll / wait as a Popen's."""

    def __init__(self, target, args: tuple, name: str):
        import multiprocessing

        from herl.util.progress import enabled

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["herl.training.trainer", "transformers.modeling_utils", "accelerate"])
        # the fork server may have started before this process's HERL_PROGRESS was set: the
        # progress choice travels with the job
        self.name = name
        self.proc = ctx.Process(target=target, args=(*args, enabled()), name=name)
        self.proc.start()
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.name, timeout or 0.0)
        return self.proc.exitcode


def start_job(cfg: HerlConfig, run_dir: Path, k: int, out_dir: Path):
    """Start the training job in its own process group; returns it (pid, wait) and its description."""
    import multiprocessing

    cmd = launch_command(cfg, run_dir, k, out_dir)
    if cmd is None and not multiprocessing.current_process().daemon:
        from herl.training.trainer import run_job

        return (ForkedJob(run_job, (str(run_dir), k, str(out_dir)), f"herl-train-{k}"),
                f"herl.training.trainer {run_dir} {k} (one process)")
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


def wait_for_job(proc, timeout_s: float | None) -> int:
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
        stop_job(proc)
        raise


def stop_job(proc) -> None:
    """Stop a job and everything it started: SIGTERM to its process group, SIGKILL to the
    group STOP_GRACE_S later (or once it ended: what it started, accelerate's ranks, goes
    too), then reap it. A job that already ended is only reaped."""
    def signal_group(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # not yet (or no longer) leading its own group
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass

    signal_group(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    signal_group(signal.SIGKILL)
    proc.wait()


def train_memory_bytes(base: Path, t) -> int:
    """A rough bound on the memory a train job needs beside the engine: float32 weights,
    gradients and two AdamW moments (4x the model's weights; with LoRA about the frozen
    weights once) and 1 GiB for activations and libraries."""
    weights = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
    return (weights if t.lora.rank else 4 * weights) + (1 << 30)


def _pythonpath() -> str:
    # the job imports herl, stages' schemas etc. from this checkout even when it is not installed
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
