"""The resident trainer's loop, in every process of the train job (herl/trainer_service):

    [accelerate launch ...] -m herl.trainer_service.server RUN_DIR CONTROL_DIR

Each process polls the control folder for the next request, steps the one Trainer it
holds (herl.training.trainer), and the main process writes the reply. A request with
`final_dir` defers the optimizer state: the reply goes as soon as the weights are written,
and once the stage says the snapshot is sealed and in place (`settled-N.json`) the trainer
writes the AdamW state into it, while the run goes on to its next rollout. It ends on `stop`,
when the stage's process (the owner) is gone, or on an error (the stage then sees the job
exit without a reply, and the next train stage starts a new trainer from the snapshots
on disk).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

POLL_S = 0.05


def owner_alive(control: Path) -> bool:
    """Whether the process that started this trainer still runs (checked on its own
    machine; another machine's ranks rely on the `stop` file and the rendezvous)."""
    try:
        owner = json.loads((control / "owner.json").read_text())
    except (OSError, ValueError):
        return False
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def wait_for_settled(control: Path, n: int) -> bool | None:
    """Whether the stage sealed request n's snapshot in place (False: it failed first);
    None when told to stop or the stage's process is gone before it said."""
    path = control / f"settled-{n}.json"
    while not path.exists():
        if (control / "stop").exists() or not owner_alive(control):
            return None
        time.sleep(POLL_S)
    return bool(json.loads(path.read_text())["sealed"])


def serve(run_dir: Path, control: Path) -> int:
    """Serve train requests for the run at run_dir until told to stop."""
    from herl.runs.rundir import load_run
    from herl.training.trainer import DISK_FULL_EXIT, Trainer
    from schemas.errors import disk_error, out_of_space

    run = load_run(run_dir)
    trainer = Trainer(run)
    offload = run.cfg.train.between_iterations in ("offload", "auto")  # a no-op on CPUs
    main = trainer.accelerator.is_main_process
    n = 0
    while True:
        request = control / f"request-{n}.json"
        if request.exists():
            req = json.loads(request.read_text())
            if offload:
                trainer.offload(to_host=False)
            final = req.get("final_dir")
            code = trainer.step(int(req["k"]), Path(req["out_dir"]), defer_optimizer=final is not None)
            sys.stdout.flush()
            sys.stderr.flush()
            if main:
                try:
                    write_json(control / f"reply-{n}.json", {"code": code})
                except OSError as exc:  # no room even for the reply: exit with the code that says so
                    if exc.errno == errno.ENOSPC:
                        return DISK_FULL_EXIT
                    raise
            if offload:  # the engine generates next: the accelerator's memory is its
                trainer.offload(to_host=True)
            if code == 0 and final is not None:
                settled = wait_for_settled(control, n)
                if settled is None:  # told to stop, or the stage's process is gone: the state stays unwritten
                    break
                if not settled:  # the stage failed after the reply: the snapshot was not put in place
                    trainer.holds = None
                else:
                    try:
                        trainer.write_optimizer(Path(final))
                    except (OSError, RuntimeError) as exc:
                        if not Path(final).exists():  # the snapshot was removed meanwhile (a redo): nowhere to write
                            trainer.holds = None
                        elif disk_error(exc) is not None or out_of_space(Path(final)):  # the next train stage says so
                            return DISK_FULL_EXIT
                        else:
                            raise
            n += 1
            continue
        if (control / "stop").exists() or not owner_alive(control):
            break
        time.sleep(POLL_S)
    trainer.close()
    return 0


def serve_job(run_dir: str, control: str, progress: bool = False) -> None:
    """The resident trainer as a child forked from the warm fork server (one process): its
    own process group, so the stage can stop it; its exit code is serve's."""
    from herl.util.procs import die_with_parent

    os.setsid()
    die_with_parent(signal.SIGKILL)  # the fork server's death (its owner's) ends it
    os.environ["HERL_PROGRESS"] = "1" if progress else "0"
    code = serve(Path(run_dir), Path(control))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve_rank(run_dir: str, control: str) -> int:
    """One rank placed on a Ray cluster (herl/cluster): its environment names its rank, the
    world size and rank 0's address, as torchrun's would; serve's exit code is returned."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        return serve(Path(run_dir), Path(control))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from herl.util.procs import die_with_parent

    die_with_parent(signal.SIGKILL)  # the launcher's death ends this rank
    run_dir, control = (argv or sys.argv[1:])[:2]
    return serve(Path(run_dir), Path(control))


if __name__ == "__main__":
    raise SystemExit(main())
