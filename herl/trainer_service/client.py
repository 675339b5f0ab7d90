"""The stage's side of the resident trainer (herl/trainer_service): start it, hand it an
iteration, wait for its snapshot, stop it.

One trainer per process at a time, like the shared engine: `resident_trainer` returns the
live one when it serves the same run and training settings, else stops it and starts a
new one. Whatever ends the wait (a stop signal, the launcher's timeout, an error) stops
the trainer's whole process group, as the stage stops a job per iteration.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from herl.training.launcher import (
    STOP_GRACE_S,
    ForkedJob,
    launch_command,
    launch_env,
    serve_command,
    stop_job,
)
from herl.util.procs import raise_if_stop_requested
from schemas.config import HerlConfig

POLL_S = 0.05
CONTROL_PREFIX = ".trainer-"  # control folders: in the system's temporary folder, or the run folder


class ResidentTrainer:
    """A started trainer job and its control folder."""

    def __init__(self, cfg: HerlConfig, run_dir: Path, key: str):
        self.key, self.run_dir, self.n = key, run_dir, 0
        self.timeout_s = cfg.train.launcher.timeout_s
        self.holds: int | None = None  # the snapshot in its memory, sealed on disk (its optimizer written or being written)
        self._unsettled: tuple[int, int] | None = None  # (request, k) whose snapshot the stage has not yet settled
        # on one machine, the system's temporary folder (a run folder on a full disk must
        # still hear the trainer say so); several machines share only the run folder
        several = cfg.train.launcher.num_machines > 1 or cfg.cluster.backend == "ray"
        where = Path(run_dir) if several else Path(tempfile.gettempdir())
        _remove_stale_controls(where)
        self.control = Path(tempfile.mkdtemp(prefix=CONTROL_PREFIX, dir=where))
        (self.control / "owner.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        self.job, self.what = _start(cfg, run_dir, self.control)

    def alive(self) -> bool:
        return self.job.poll() is None

    def train(self, k: int, out_dir: Path, timeout_s: float | None, final_dir: Path | None = None) -> int:
        """Train iteration k into out_dir; returns the exit code a one-shot job would have
        (the job's own exit code if it died without replying). final_dir: where the stage
        puts the snapshot once sealed; the optimizer state is then left out of out_dir and
        written there after `settle(sealed=True)`."""
        if self._unsettled is not None:  # a stage that never settled its snapshot: not sealed
            self.settle(False)
        n, self.n = self.n, self.n + 1
        self.holds = None
        tmp = self.control / f"request-{n}.json.tmp"
        request = {"k": k, "out_dir": str(out_dir), **({"final_dir": str(final_dir)} if final_dir else {})}
        tmp.write_text(json.dumps(request))
        os.replace(tmp, self.control / f"request-{n}.json")
        reply = self.control / f"reply-{n}.json"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while not reply.exists():
                code = self.job.poll()
                if code is not None:
                    return code if code != 0 else 1  # ended without answering: never a success
                raise_if_stop_requested()
                if deadline is not None and time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired("herl.trainer_service.server", timeout_s or 0.0)
                time.sleep(POLL_S)
        except BaseException:
            self.close(graceful=False)
            raise
        code = int(json.loads(reply.read_text())["code"])
        if code == 0:
            self._unsettled = (n, k) if final_dir is not None else None
            self.holds = None if final_dir is not None else k + 1
        return code

    def settle(self, sealed: bool) -> None:
        """Tell the trainer whether the snapshot of its last request is sealed in place (it
        then writes the deferred optimizer state there) or not (it forgets it)."""
        if self._unsettled is None or not self.control.exists():  # nothing asked, or the trainer was stopped
            return
        (n, k), self._unsettled = self._unsettled, None
        tmp = self.control / f"settled-{n}.json.tmp"
        tmp.write_text(json.dumps({"sealed": sealed}))
        os.replace(tmp, self.control / f"settled-{n}.json")
        self.holds = k + 1 if sealed else None

    def close(self, graceful: bool = True) -> None:
        """Ask the job to end (graceful), then stop its whole process group; remove the control folder."""
        if graceful and self.alive():
            (self.control / "stop").write_text("")
            try:  # a deferred optimizer state being written is finished first
                self.job.wait(timeout=max(STOP_GRACE_S, self.timeout_s or 3600.0))
            except subprocess.TimeoutExpired:
                pass
        stop = getattr(self.job, "stop", None)  # ranks placed on a cluster (herl/cluster)
        stop() if stop is not None else stop_job(self.job)
        shutil.rmtree(self.control, ignore_errors=True)


def _start(cfg: HerlConfig, run_dir: Path, control: Path):
    import multiprocessing

    if cfg.cluster.backend == "ray":
        return _start_on_ray(cfg, run_dir, control)
    if launch_command(cfg, run_dir, 0, control) is None and not multiprocessing.current_process().daemon:
        from herl.trainer_service.server import serve_job

        return ForkedJob(serve_job, (str(run_dir), str(control)), "herl-trainer"), \
            f"herl.trainer_service.server {run_dir} (one process)"
    cmd = serve_command(cfg, run_dir, control)
    return subprocess.Popen(cmd, start_new_session=True, env=launch_env(cfg)), " ".join(cmd[1:])


def _start_on_ray(cfg: HerlConfig, run_dir: Path, control: Path):
    """The ranks as Ray actors in one placement group (herl/cluster), each serving the run
    as a process of `accelerate launch` would."""
    from herl.cluster.ray_backend import RayRankJob, connect, describe

    c, n = cfg.cluster, cfg.train.launcher.num_processes
    connect(c.address)
    bundle = {"CPU": c.trainer_cpus, **({"GPU": c.trainer_gpus} if c.trainer_gpus else {}), **c.trainer_resources}
    job = RayRankJob("trainer ranks", n, bundle, c.strategy, c.start_timeout_s, run_dir,
                     "herl.trainer_service.server", "serve_rank", (str(run_dir), str(control)),
                     {"ACCELERATE_MIXED_PRECISION": cfg.train.mixed_precision, "ACCELERATE_DYNAMO_BACKEND": "NO"})
    where = ", ".join(f"rank {i} on {describe(node)} pid {node['pid']}" for i, node in enumerate(job.nodes))
    print(f"herl: trainer ranks placed on the Ray cluster: {where}", file=sys.stderr, flush=True)
    return job, f"herl.trainer_service.server {run_dir} ({n} Ray actors)"


def _remove_stale_controls(where: Path) -> None:
    """Control folders whose owner is gone (a killed run) are removed."""
    from herl.trainer_service.server import owner_alive

    for folder in Path(where).glob(CONTROL_PREFIX + "*"):
        if not owner_alive(folder):
            shutil.rmtree(folder, ignore_errors=True)


_TRAINER: dict[str, ResidentTrainer] = {}


def trainer_key(cfg: HerlConfig, run_dir: Path) -> str:
    """What a trainer serves: the run folder and every setting of the train job."""
    return json.dumps([str(Path(run_dir).resolve()), cfg.seed, cfg.model.model_dump(mode="json"),
                       cfg.train.model_dump(mode="json"), cfg.rollout.max_tokens, cfg.hindsight.max_tokens,
                       cfg.hindsight.max_train_prompt_tokens, cfg.cluster.model_dump(mode="json")], sort_keys=True)


def resident_trainer(cfg: HerlConfig, run_dir: Path) -> tuple[ResidentTrainer, bool]:
    """(the run's trainer, whether it was started now): the live one serving these
    settings, or a new one (any other stopped first)."""
    key = trainer_key(cfg, run_dir)
    current = _TRAINER.get("trainer")
    if current is not None and current.key == key and current.alive():
        return current, False
    release_trainers()
    atexit.unregister(release_trainers)  # registered once
    atexit.register(release_trainers)
    _TRAINER["trainer"] = ResidentTrainer(cfg, Path(run_dir), key)
    return _TRAINER["trainer"], True


def live_trainer() -> ResidentTrainer | None:
    t = _TRAINER.get("trainer")
    return t if t is not None and t.alive() else None


def release_trainers() -> None:
    """Stop the resident trainer, if any (the end of a flow, a benchmark run, exit)."""
    while _TRAINER:
        _, trainer = _TRAINER.popitem()
        trainer.close()
