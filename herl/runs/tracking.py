"""Experiment tracking: every metric of a run's metrics tables, to TensorBoard, W&B, MLflow.

Reads:  iter-<k>/metrics-<stage>.parquet of every finished iteration, the run's config.
Writes: runs/<id>/tracking/tensorboard/ (event files), tracking/wandb/ (W&B's own folder),
        tracking/mlruns/ (MLflow's file store, unless tracking.mlflow_uri names a server),
        and tracking/ledger.json: the tracker runs' ids and the iterations each has.

A metric `name` of stage `s` in iteration k is logged as `s/name` at step k; the config is
logged once as hyperparameters. `sync` is idempotent, so the flow calls it after every
iteration and a resumed run continues the same tracker runs: an iteration is logged when
it is finished and not yet in the tracker (the ledger, and for TensorBoard and MLflow the
tracker's own record too, so an iteration logged just before a crash is not logged again).

    python -m herl.runs.tracking runs/R      # (re)send a run's metrics to its trackers
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from herl.runs.rundir import Run, load_run
from schemas.errors import UserError


class TrackingError(UserError):
    """A tracker named in tracking.report_to cannot be used (its package is missing...)."""


def iteration_metrics(run: Run, k: int) -> dict[str, float] | None:
    """{"stage/name": value} of iteration k, or None while any of its stages is unfinished."""
    stages = run.cfg.iteration_stages(k)
    if not stages or any((run.read_manifest(k, s) or {}).get("status") != "done" for s in stages):
        return None
    return {f"{stage}/{name}": float(value) for stage, name, value in run.metric_rows(k, stages)}


def flat_config(cfg) -> dict[str, Any]:
    """The config as dotted keys ("train.learning_rate": 1e-06), lists as JSON text."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, v in value.items():
                walk(f"{prefix}.{key}" if prefix else key, v)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else value

    walk("", cfg.model_dump(mode="json"))
    return out


# ---- the trackers -------------------------------------------------------------------


class Tracker(Protocol):
    name: str

    def __init__(self, run: Run, state: dict) -> None: ...  # state: this tracker's ledger entry
    def logged_steps(self) -> set[int]: ...  # the iterations the tracker already holds
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def _quiet_writer_threads() -> None:
    """TensorBoard writes events from a thread of its own, which prints a traceback when
    the disk is full or read-only; the same error reaches the flow through `log`'s flush,
    which warns in one line (sync_trackers) and sends the metrics again later. So such a
    thread's disk error prints nothing; every other thread's error is printed as before."""
    import errno
    import threading

    if getattr(threading.excepthook, "herl_quiet", False):
        return
    previous = threading.excepthook

    def hook(args) -> None:
        thread_module = type(args.thread).__module__ if args.thread is not None else ""
        if (thread_module.startswith("tensorboard") and isinstance(args.exc_value, OSError)
                and args.exc_value.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)):
            return
        previous(args)

    hook.herl_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class TensorBoard:
    name = "tensorboard"

    def __init__(self, run: Run, state: dict):
        from torch.utils.tensorboard import SummaryWriter

        _quiet_writer_threads()
        self.dir = run.path / "tracking" / "tensorboard"
        fresh = not self.dir.exists()
        self.writer = SummaryWriter(str(self.dir))
        if fresh:
            cfg = json.dumps(flat_config(run.cfg), indent=1)
            self.writer.add_text("config", f"```\n{cfg}\n```", 0)

    def logged_steps(self) -> set[int]:
        """The steps the event files already hold a scalar for (read back, not assumed)."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(self.dir), size_guidance={"scalars": 0})
        acc.Reload()
        return {e.step for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    name = "wandb"

    def __init__(self, run: Run, state: dict):
        import wandb
        t = run.cfg.tracking
        # one W&B run per herl run, resumed by id: a resumed herl run continues it
        state.setdefault("id", "herl-" + "".join(c if c.isalnum() else "-" for c in run.run_id.lower())[:56])
        folder = run.path / "tracking"
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=t.project, entity=t.wandb_entity, name=run.run_id, id=state["id"],
                              resume="allow", dir=str(folder), mode=t.wandb_mode, config=flat_config(run.cfg),
                              settings=wandb.Settings(console="off", silent=True))

    def logged_steps(self) -> set[int]:
        return set()  # an offline run cannot be asked: the ledger answers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    name = "mlflow"

    def __init__(self, run: Run, state: dict):
        from mlflow.tracking import MlflowClient
        t = run.cfg.tracking
        uri = t.mlflow_uri or (run.path / "tracking" / "mlruns").resolve().as_uri()
        if t.mlflow_uri is None:
            # MLflow 3 keeps its file store (maintenance mode) behind this switch; it is the
            # store that needs no database and no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if "run_id" not in state:
            exp = self.client.get_experiment_by_name(t.project)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(t.project)
            created = self.client.create_run(exp_id, run_name=run.run_id, tags={"herl.run_id": run.run_id})
            state["run_id"] = created.info.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in flat_config(run.cfg).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a call
                self.client.log_batch(state["run_id"], params=params[i:i + 100])
        self.run_id = state["run_id"]

    def logged_steps(self) -> set[int]:
        data = self.client.get_run(self.run_id).data
        steps: set[int] = set()
        for key in data.metrics:
            steps |= {m.step for m in self.client.get_metric_history(self.run_id, key)}
        return steps

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def close(self) -> None:
        pass


_CLASSES: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": Mlflow}


# ---- the ledger and sync -------------------------------------------------------------


def _ledger_path(run: Run) -> Path:
    return run.path / "tracking" / "ledger.json"


def read_ledger(run: Run) -> dict:
    path = _ledger_path(run)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or torn: the trackers' own records still stop repeats


def _write_ledger(run: Run, ledger: dict) -> None:
    path = _ledger_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(ledger, indent=1, sort_keys=True))
    os.replace(tmp, path)


def sync(run: Run, upto: int | None = None) -> dict[str, list[int]]:
    """Send every finished iteration (<= upto) that a tracker lacks; {tracker: steps sent}."""
    names = list(dict.fromkeys(run.cfg.tracking.report_to))
    if not names:
        return {}
    check_trackers(run.cfg)  # a missing package is named with its fix, not as an ImportError
    last = run.cfg.iterations if upto is None else upto
    ledger = read_ledger(run)
    # the iterations some tracker's ledger lacks: only these are read (not the whole run each time)
    lacking = [k for k in range(last + 1)
               if any(k not in ledger.get(name, {}).get("steps", []) for name in names)]
    pending = {k: m for k in lacking if (m := iteration_metrics(run, k)) is not None}
    sent: dict[str, list[int]] = {}
    for name in names:
        state = ledger.setdefault(name, {})
        done = set(state.get("steps", []))
        todo = [k for k in sorted(pending) if k not in done]
        if not todo and "steps" in state:
            continue
        tracker = _CLASSES[name](run, state)
        try:
            done |= tracker.logged_steps()
            sent[name] = []
            for k in todo:
                if k in done:
                    continue
                tracker.log(k, pending[k])
                done.add(k)
                sent[name].append(k)
                state["steps"] = sorted(done)
                _write_ledger(run, ledger)
        finally:
            tracker.close()
        state["steps"] = sorted(done)
        _write_ledger(run, ledger)
    return sent


def check_trackers(cfg) -> None:
    """Fail before the run starts when a tracker in tracking.report_to is not installed
    (looked up, not imported: the check costs nothing)."""
    import importlib.util

    packages = {"tensorboard": ("tensorboard", "pip install tensorboard"),
                "wandb": ("wandb", "pip install 'herl[tracking]'"),
                "mlflow": ("mlflow", "pip install 'herl[tracking]'")}
    for name in dict.fromkeys(cfg.tracking.report_to):
        package, fix = packages[name]
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # a module set to None, as a test does
            found = False
        if not found:
            raise TrackingError(f"tracking.report_to has {name}, but it cannot be imported (no {package} package): "
                                f"{fix}, or take it out of tracking.report_to")


def sync_trackers(run: Run, k: int, logger) -> None:
    """sync() for the flow: a tracker that fails (a server down) costs a warning, not the
    run; the next iteration, or a resume, sends what it missed."""
    try:
        sync(run, upto=k)
    except Exception as exc:  # noqa: BLE001 (any tracker's failure)
        logger.warning("tracking: %s: %s (sent again after the next iteration or on resume)", type(exc).__name__, exc)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Send a run's metrics to the trackers of its config")
    ap.add_argument("run_dir")
    args = ap.parse_args(argv)
    for name, steps in sync(load_run(args.run_dir)).items():
        print(f"{name}: sent iterations {steps or 'none (all there)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
