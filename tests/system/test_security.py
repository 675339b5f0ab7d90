"""Holes a hostile user found: writes through `herl sql`, the judge's API key in stored
reasons, unchecked snapshot weights, run ids that escape runs_dir, unvalidated rubric
weights / params / prompt lengths / pool sizes. (Processes left behind by a kill: test_resume.py
and test_hostile.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from herl.commands.cli import main
from herl.data.importers import PromptFileError, load_prompts
from herl.data.pool import check_pool_fits
from herl.generation.engines import (
    GenRequest,
    PromptTooLongError,
    SamplingParams,
    TransformersEngine,
)
from herl.models.paths import resolve_model_path
from herl.models.snapshot import SnapshotAlteredError
from herl.runs.query import ReadOnlyQueryError, connect_run, query_run
from herl.runs.rundir import fingerprint, load_run, open_run
from herl.runs.status import stage_status
from schemas.config import ConfigError, load_config
from stages import rollout, run_iteration, train
from tests.helpers import small_overrides


def _tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory):
    cfg = load_config(None, small_overrides(tmp_path_factory.mktemp("runs"), run_id="sec"))
    run = open_run(cfg)
    for k in range(2):
        run_iteration(run, k)
    return run


# ---- herl sql --------------------------------------------------------------------------

WRITES = [
    "EXPLAIN ANALYZE COPY (SELECT * FROM rewards WHERE false) TO '{run}/iter-0/rewards.parquet' (FORMAT parquet)",
    "WITH a AS (COPY (SELECT 1 AS a) TO '{run}/iter-1' (FORMAT parquet, PARTITION_BY (a), OVERWRITE true)) SELECT 1",
    "WITH a AS (COPY (SELECT 1 AS a) TO '{run}/config.json' (FORMAT csv)) SELECT * FROM rewards",
    "SELECT 1 FROM (WITH b AS (COPY (SELECT 1 AS b) TO '{run}/snapshots/policy-1/model.safetensors') SELECT 1)",
    "COPY rewards TO '{run}/iter-0/rewards.parquet'",
    "EXPLAIN SELECT 1",
    "PRAGMA database_list",
    "ATTACH '{run}/x.db' AS x",
    "SET temp_directory = '{run}'",
    "SELECT 1; DROP VIEW rewards",
    "CALL pragma_version()",
]


@pytest.mark.parametrize("template", WRITES)
def test_sql_accepts_only_a_plain_select(two_iterations, template):
    path = two_iterations.path
    before = _tree_digest(path)
    with pytest.raises(ReadOnlyQueryError):
        query_run(path, template.format(run=path)).fetchall()
    assert _tree_digest(path) == before


def test_sql_connection_cannot_touch_files_even_past_the_parser(two_iterations, tmp_path, monkeypatch):
    """The second lock alone: the connection itself refuses every file, inside the run too."""
    import duckdb

    path = two_iterations.path
    monkeypatch.chdir(tmp_path)  # DuckDB's default spill folder would be ./.tmp
    before = _tree_digest(path)
    con = connect_run(path)
    for sql in [f"COPY (SELECT 1 AS a) TO '{path}/iter-0/rewards.parquet' (FORMAT parquet)",
                f"COPY (SELECT 1 AS a) TO '{path}/config.json' (FORMAT csv)",
                f"SELECT * FROM read_parquet('{path}/iter-0/rewards.parquet')",
                "SELECT * FROM read_csv('/etc/passwd')",
                f"ATTACH '{path}/x.db' AS x"]:
        with pytest.raises(duckdb.Error, match="disabled by configuration|Permission"):
            con.sql(sql).fetchall()
    for sql in ["SET enable_external_access = true", f"SET temp_directory = '{tmp_path}'",
                "SET lock_configuration = false"]:
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute(sql)
    assert con.execute("SELECT current_setting('temp_directory')").fetchone()[0] == ""
    # reading through the views still works, and nothing was written anywhere
    assert con.execute("SELECT count(*) FROM rewards").fetchone()[0] == 2 * 4 * 4
    assert _tree_digest(path) == before and not (tmp_path / ".tmp").exists()


def test_herl_sql_reports_errors_in_one_line(two_iterations, capsys):
    path = str(two_iterations.path)
    for query in ["SELECT error('boom')", "SELECT * FROM no_such_table", "SELEC 1",
                  f"EXPLAIN ANALYZE COPY rewards TO '{path}/iter-0/rewards.parquet'"]:
        assert main(["sql", path, query]) == 2
        err = capsys.readouterr().err
        assert err.startswith("herl sql: ") and "Traceback" not in err, err
    assert main(["sql", str(two_iterations.path.parent), "SELECT 1"]) == 2
    assert "not a herl run directory" in capsys.readouterr().err
    assert main(["sql", path, "SELECT count(*) AS n FROM rewards", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"n": 32}


# ---- snapshot weights --------------------------------------------------------------------

def test_replaced_or_truncated_snapshot_weights_redo_train(two_iterations):
    run = load_run(two_iterations.path)
    snap = run.snapshot(1)
    weights = snap / "model.safetensors"
    original = weights.read_bytes()
    train_before = run.read_manifest(0, "train")
    rollout_before = run.read_manifest(1, "rollout")

    for damage in ("replace", "truncate"):
        if damage == "replace":  # other valid weights of the same size: loads fine, silently wrong
            shutil.copyfile(run.snapshot(2) / "model.safetensors", weights)
        else:
            weights.write_bytes(original[: len(original) // 2])
        assert fingerprint(snap).startswith("snapshot-altered:")
        # nothing samples from or trains on it...
        with pytest.raises(SnapshotAlteredError, match="model.safetensors"):
            rollout.run(load_run(run.path), 1)
        # ...and the stage that wrote it is redone, giving back the same weights
        m = train.run(load_run(run.path), 0)
        assert m["skipped"] is False and m["attempts"] == train_before["attempts"] + 1
        assert weights.read_bytes() == original
        assert m["outputs"]["snapshot"]["fingerprint"] == train_before["outputs"]["snapshot"]["fingerprint"]
        train_before = m
        # the next iteration's stages see the same snapshot id: still current, not redone
        assert rollout.run(load_run(run.path), 1)["skipped"] is True
    assert run.read_manifest(1, "rollout") == rollout_before


def test_recorded_digests_spare_hashing_only_while_a_file_is_unchanged(two_iterations, monkeypatch):
    """A stage's inputs and a snapshot's weights are hashed by whoever wrote them (as they
    were written); a later process takes those digests from the manifests and
    herl_snapshot.json without reading the bytes, unless the file was rewritten or touched
    since (then it is hashed again)."""
    import schemas.tables as tables

    run = load_run(two_iterations.path)
    assert all("sha256" in o for o in run.read_manifest(1, "grade")["outputs"].values())
    hashed: list[str] = []
    real = tables.hashlib.sha256

    class Spy:
        @staticmethod
        def sha256(*a):
            hashed.append("x")
            return real(*a)

    monkeypatch.setattr(tables, "hashlib", Spy)
    monkeypatch.setattr(tables, "_digests", {})  # a new process: it has hashed nothing
    assert rollout.run(load_run(run.path), 1)["skipped"] is True
    assert train.run(load_run(run.path), 1)["skipped"] is True  # batch, rollouts, hindsight, policy-1
    assert hashed == []  # every input and output recalled: not one byte read to verify them
    rewards = run.table(1, "rewards")
    os.utime(rewards)  # same bytes, but nothing vouches for them any more
    monkeypatch.setattr(tables, "_digests", {})
    run.recall_digests([rewards])
    assert hashed == [] and fingerprint(rewards) == "sha256:" + real(rewards.read_bytes()).hexdigest()[:24]
    assert len(hashed) == 1  # hashed again, once


def test_snapshot_without_recorded_digests_is_not_trusted(two_iterations, tmp_path):
    snap = tmp_path / "policy"
    shutil.copytree(two_iterations.snapshot(2), snap)
    meta = json.loads((snap / "herl_snapshot.json").read_text())
    assert set(meta["files"]) >= {"model.safetensors", "optimizer.pt", "config.json"}
    assert fingerprint(snap) == "snapshot:" + meta["snapshot_id"]
    del meta["files"]
    (snap / "herl_snapshot.json").write_text(json.dumps(meta))
    assert fingerprint(snap).startswith("snapshot-altered:")


# ---- paths, rubric values, prompt sizes -----------------------------------------------------

@pytest.mark.parametrize("run_id", ["../x", "/tmp/abs", "..", "a/b", ".hidden", "-x", ""])
def test_run_id_cannot_escape_runs_dir(tmp_path, run_id):
    with pytest.raises(ConfigError, match="run_id"):
        load_config(None, {"run_id": run_id, "runs_dir": str(tmp_path)})
    assert list(tmp_path.iterdir()) == []


def test_pool_size_is_bounded():
    for key in ("task.num_prompts", "task.prompts_per_iteration"):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, {key: 1e9})


def _write(tmp_path: Path, rows: list[dict]) -> Path:
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _row(i: int, item: dict, content: str = "Say hi.") -> dict:
    return {"prompt_id": f"p{i}", "messages": [{"role": "user", "content": content}], "rubric": [item]}


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rubric_weights_are_refused(tmp_path, weight):
    f = _write(tmp_path, [_row(0, {"item_id": "a", "kind": "no_digits"}),
                          _row(1, {"item_id": "b", "kind": "judge", "description": "Polite.", "weight": weight})])
    with pytest.raises(PromptFileError, match=r"line 2: field 'rubric\[0\]\.weight': must be a finite number"):
        load_prompts(f)
    rar = tmp_path / "rar.jsonl"
    rar.write_text(json.dumps({"question": "Q?", "rubric": [{"title": "t", "description": "d", "weight": weight}]}) + "\n")
    with pytest.raises(PromptFileError, match="finite"):
        load_prompts(rar)


def test_params_must_fit_the_check_even_with_a_description(tmp_path):
    bad = [{"item_id": "a", "kind": "char_length", "description": "Be short.", "params": {"maximum": 10}},
           {"item_id": "a", "kind": "include", "description": "Say hi."}]  # required `text` missing
    for item in bad:
        with pytest.raises(PromptFileError, match=r"line 1: field 'rubric\[0\]\.params': do not fit kind"):
            load_prompts(_write(tmp_path, [_row(0, item)]))
    ok = load_prompts(_write(tmp_path, [_row(0, {"item_id": "a", "kind": "char_length", "description": "Be short.",
                                                 "params": {"max": 10}})]))
    assert ok[0]["rubric"][0]["description"] == "Be short."


def test_prompt_longer_than_the_context_is_refused_before_generation(tmp_path):
    long_text = "word " * 15000  # ~75k byte tokens: the tiny model's context is 4096
    f = _write(tmp_path, [_row(0, {"item_id": "a", "kind": "no_digits"}),
                          _row(1, {"item_id": "a", "kind": "no_digits"}, long_text)])
    cfg = load_config(None, small_overrides(tmp_path / "runs", **{"task.source": str(f), "task.prompts_per_iteration": 2}))
    with pytest.raises(PromptTooLongError, match=r"prompts\.jsonl: 1 prompt\(s\) do not fit .* \(4096 tokens\).*p1"):
        check_pool_fits(cfg)
    assert not (tmp_path / "runs").exists()
    # the engine refuses too (hindsight prompts, herl eval), before allocating anything
    engine = TransformersEngine(resolve_model_path("builtin:tiny"))
    with pytest.raises(PromptTooLongError, match="p-long"):
        engine.generate([GenRequest("p-ok", [1, 2, 3], 0, 1), GenRequest("p-long", [1] * 4090, 0, 1)],
                        SamplingParams(1.0, 1.0, 0, 8))
    assert len(engine.generate([GenRequest("p-ok", [1, 2, 3], 0, 1)], SamplingParams(1.0, 1.0, 0, 8))[0]) == 1


def test_sql_is_read_only(done_run):
    path = done_run.path
    before = sorted(p.name for p in (path / "iter-0").iterdir())
    with pytest.raises(ReadOnlyQueryError):
        query_run(path, f"COPY rewards TO '{path}/iter-0/rewards.parquet'")
    with pytest.raises(ReadOnlyQueryError):
        query_run(path, "SELECT 1; DROP VIEW rewards")
    with pytest.raises(Exception, match="disabled by configuration"):
        query_run(path, "SELECT * FROM read_csv('/etc/passwd')").fetchall()
    # DuckDB's own lock holds even for statements the filter above never lets through:
    # on the connection itself, the settings cannot be switched back on.
    import duckdb
    con = connect_run(path)
    for statement in ("SET enable_external_access = true", "SET lock_configuration = false",
                      "SET temp_directory = '/tmp'"):
        with pytest.raises(duckdb.InvalidInputException, match="locked"):
            con.execute(statement)
    with pytest.raises(duckdb.PermissionException):
        con.execute(f"COPY (SELECT 1) TO '{path}/iter-0/x.csv'")
    assert not (path / "iter-0" / "x.csv").exists()
    assert sorted(p.name for p in (path / "iter-0").iterdir()) == before
    status = stage_status(path)
    assert [r["status"] for r in status] == ["done"] * 10
