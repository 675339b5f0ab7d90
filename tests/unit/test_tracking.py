"""Experiment tracking: TensorBoard, W&B (offline) and MLflow (local file store) get every
metric of every iteration, once, with the values of the metrics tables, also when the
ledger is lost after a crash and the run is synced again."""

from __future__ import annotations

import glob
import json
import shutil
import struct
from collections import Counter

import pytest

from herl.runs.rundir import Run
from herl.runs.tracking import check_trackers, sync
from schemas.config import load_config
from tests.helpers import expected_points, sig5, tensorboard_points

ALL = ["tensorboard", "wandb", "mlflow"]


def _tracked_copy(done_run, tmp_path, report_to) -> Run:
    path = tmp_path / "t"
    shutil.copytree(done_run.path, path)
    cfg = done_run.cfg.model_copy(update={"tracking": done_run.cfg.tracking.model_copy(
        update={"report_to": report_to})})
    return Run(path=path, cfg=cfg)


def mlflow_points(run: Run) -> Counter:
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run.path / "tracking" / "ledger.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient((run.path / "tracking" / "mlruns").resolve().as_uri())
    keys = client.get_run(run_id).data.metrics
    return Counter((k, m.step, sig5(m.value)) for k in keys for m in client.get_metric_history(run_id, k))


def _wandb_records(path: str):
    """The protobuf records of a .wandb file (W&B's LevelDB-style log: 32 KiB blocks of
    checksum, length, type, data; type 1 a whole record, 2-4 its first / middle / last part)."""
    data, pos, part = open(path, "rb").read(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield chunk
        elif kind in (2, 3):
            part = (b"" if kind == 2 else part) + chunk
        elif kind == 4:
            yield part + chunk


def wandb_points(run: Run) -> Counter:
    from wandb.proto import wandb_internal_pb2 as pb

    out: Counter = Counter()
    for path in glob.glob(str(run.path / "tracking" / "wandb" / "offline-run-*" / "*.wandb")):
        for raw in _wandb_records(path):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") == "history":
                for item in rec.history.item:
                    key = item.key or "/".join(item.nested_key)  # "grade/x" is stored as a nested key
                    if not key.startswith("_"):  # W&B's own _step, _runtime, _timestamp
                        out[(key, rec.history.step.num, sig5(json.loads(item.value_json)))] += 1
    return out


def test_every_metric_once_in_each_tracker_across_a_lost_ledger(done_run, tmp_path):
    run = _tracked_copy(done_run, tmp_path, ALL)
    assert sync(run, upto=0) == {"tensorboard": [0], "wandb": [0], "mlflow": [0]}
    # a crash after sending iteration 0, before the ledger recorded it: TensorBoard's event
    # files and MLflow's store say what they hold, so iteration 0 is not sent twice
    ledger_path = run.path / "tracking" / "ledger.json"
    ledger = json.loads(ledger_path.read_text())
    for name in ("tensorboard", "mlflow"):
        ledger[name]["steps"] = []
    ledger_path.write_text(json.dumps(ledger))
    assert sync(run) == {"tensorboard": [1], "wandb": [1], "mlflow": [1]}
    assert sync(run) == {}  # a resumed run's sync finds everything there

    want = expected_points(run)
    assert len(want) > 40 and {k for _, k, _ in want} == {0, 1}
    assert any(key == "train/loss" for key, _, _ in want) and any(key.startswith("grade/") for key, _, _ in want)
    for name, points in (("tensorboard", tensorboard_points(run)), ("mlflow", mlflow_points(run)),
                         ("wandb", wandb_points(run))):
        assert points == want, name  # every metric of every iteration, each once, same values


def test_config_goes_along_as_hyperparameters(done_run, tmp_path):
    from mlflow.tracking import MlflowClient

    run = _tracked_copy(done_run, tmp_path, ["mlflow"])
    sync(run)
    run_id = json.loads((run.path / "tracking" / "ledger.json").read_text())["mlflow"]["run_id"]
    params = MlflowClient((run.path / "tracking" / "mlruns").resolve().as_uri()).get_run(run_id).data.params
    assert params["train.learning_rate"] == str(run.cfg.train.learning_rate)
    assert params["rollout.n"] == "4" and params["algorithm"] == "herl"


def test_no_trackers_and_missing_packages(done_run, tmp_path, monkeypatch):
    run = _tracked_copy(done_run, tmp_path, [])
    assert sync(run) == {} and not (run.path / "tracking").exists()
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    cfg = load_config(None, {"tracking.report_to": ["wandb"]})
    with pytest.raises(Exception, match=r"tracking.report_to has wandb, but it cannot be imported.*herl\[tracking\]"):
        check_trackers(cfg)
