"""Table contracts (schemas/tables.py): checked writes and reads, atomic writes that leave
nothing on failure, older runs' files read under renamed columns, rows without their
temperature."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.config import HerlConfig
from schemas.tables import TABLES, SchemaError, read_table, write_table


def _metric_rows():
    return [{"run_id": "r", "iteration": 0, "stage": "s", "name": "x", "value": 1.0}]


def test_write_read_roundtrip_and_schema_errors(tmp_path):
    p = tmp_path / "m.parquet"
    assert write_table("metrics", _metric_rows(), p) == 1
    assert read_table("metrics", p).to_pylist() == _metric_rows()
    with pytest.raises(SchemaError, match="missing fields"):
        write_table("metrics", [{"run_id": "r"}], tmp_path / "bad.parquet")
    pq.write_table(pa.table({"run_id": ["r"]}), tmp_path / "alien.parquet")
    with pytest.raises(SchemaError, match=r"alien.parquet: table 'metrics' has missing fields"):
        read_table("metrics", tmp_path / "alien.parquet")
    with pytest.raises(SchemaError, match="metrics.value"):
        write_table("metrics", pa.table({"run_id": ["r"], "iteration": [0], "stage": ["s"], "name": ["x"],
                                         "value": ["not a number"]}), tmp_path / "bad2.parquet")


def test_failed_write_leaves_nothing(tmp_path):
    bad = [{"run_id": "r", "iteration": "zero", "stage": "s", "name": "x", "value": 1.0}]
    with pytest.raises(SchemaError):
        write_table("metrics", bad, tmp_path / "m.parquet")
    assert list(tmp_path.iterdir()) == []


def test_a_renamed_column_reads_from_an_older_runs_files(tmp_path):
    """rewards.items_total became items_scored: a file written before reads (read_table,
    open_dataset, herl sql) under the new name, with its values."""
    from herl.runs.query import query_run
    from schemas.tables import open_dataset

    row = {"run_id": "r", "iteration": 0, "rollout_id": "a", "prompt_id": "p", "reward": 0.5,
           "items_met": 1, "items_scored": 2, "items_unknown": 0, "looped": False}
    old = pa.Table.from_pylist([row]).rename_columns(
        ["items_total" if n == "items_scored" else n for n in row])
    (tmp_path / "iter-0").mkdir()
    pq.write_table(old, tmp_path / "iter-0" / "rewards.parquet")
    (tmp_path / "config.json").write_text(HerlConfig().model_dump_json())
    new = {**row, "iteration": 1, "rollout_id": "b", "items_scored": 3}
    (tmp_path / "iter-1").mkdir()
    write_table("rewards", [new], tmp_path / "iter-1" / "rewards.parquet")
    assert read_table("rewards", tmp_path / "iter-0" / "rewards.parquet").to_pylist() == [row]
    assert open_dataset("rewards", tmp_path / "iter-0" / "rewards.parquet").to_table().to_pylist() == [row]
    got = query_run(tmp_path, "SELECT rollout_id, items_scored FROM rewards ORDER BY 1").fetchall()
    assert got == [("a", 2), ("b", 3)]


def test_an_older_batch_reads_with_ids_named_for_what_they_point_to(tmp_path):
    """batch.rollout_ref became rollout_id and source_id became revision_id (hindsight rows
    only): a file written before reads with the new ids, by the stages and by herl sql."""
    from herl.runs.query import query_run

    base = {"run_id": "r", "iteration": 0, "prompt_id": "p", "hindsight_prompt": False, "temperature": 1.0,
            "reward": 0.5, "shaped_reward": 0.5, "group_mean": 0.5, "group_std": 0.1, "group_size": 2, "advantage": 0.0}
    old = [{**base, "sample_id": "0:p:0", "source_id": "0:p:0", "rollout_ref": "0:p:0", "kind": "rollout",
            "is_hindsight": False, "replaced_rollout_id": None},
           {**base, "sample_id": "0:p:1:rev-0", "source_id": "0:p:1:rev-0", "rollout_ref": "0:p:1", "kind": "hindsight",
            "is_hindsight": True, "replaced_rollout_id": "0:p:2"}]
    (tmp_path / "iter-0").mkdir()
    pq.write_table(pa.Table.from_pylist(old), tmp_path / "iter-0" / "batch.parquet")
    (tmp_path / "config.json").write_text(HerlConfig().model_dump_json())
    got = read_table("batch", tmp_path / "iter-0" / "batch.parquet").select(["sample_id", "rollout_id", "revision_id"])
    assert got.to_pylist() == [{"sample_id": "0:p:0", "rollout_id": "0:p:0", "revision_id": None},
                               {"sample_id": "0:p:1:rev-0", "rollout_id": "0:p:1", "revision_id": "0:p:1:rev-0"}]
    assert query_run(tmp_path, "SELECT count(revision_id) FROM batch").fetchall() == [(1,)]


def test_rows_without_their_temperature_are_refused_by_stages_and_read_by_sql(tmp_path):
    """Rollouts written before rows carried their sampling temperature: a stage reading
    them says so and what to do; herl sql still reads them (temperature null)."""
    from herl.runs.query import query_run

    row = {"run_id": "r", "iteration": 0, "rollout_id": "0:p:0", "prompt_id": "p", "sample_index": 0,
           "prompt_text": "q", "prompt_token_ids": [1], "response_text": "a", "response_token_ids": [2],
           "finish_reason": "stop", "num_tokens": 1, "seed": 0, "snapshot_id": "s", "logprobs": None}
    (tmp_path / "iter-0").mkdir()
    path = tmp_path / "iter-0" / "rollouts.parquet"
    pq.write_table(pa.Table.from_pylist([row], schema=TABLES["rollouts"].schema.remove(
        TABLES["rollouts"].schema.get_field_index("temperature"))), path)
    (tmp_path / "config.json").write_text(HerlConfig().model_dump_json())
    with pytest.raises(SchemaError, match=r"no field\(s\) \['temperature'\].*earlier herl version.*start a new run"):
        read_table("rollouts", path)
    assert query_run(tmp_path, "SELECT rollout_id, temperature FROM rollouts").fetchall() == [("0:p:0", None)]


def test_a_flipped_bit_in_a_copied_table_fails_its_page_checksum(tmp_path):
    """Tables are written with a CRC per page and read with it checked: a bit flipped in a
    copy that has no run digests beside it still fails to read, never reads as data."""
    from schemas.tables import open_dataset, read_table, write_table

    rows = [{"run_id": "r", "iteration": 0, "stage": "grade", "name": f"m{i}", "value": i / 7} for i in range(5000)]
    path = tmp_path / "metrics-grade.parquet"
    write_table("metrics", rows, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 4] ^= 0x08  # inside the first column's pages, far from the footer
    path.write_bytes(bytes(data))
    with pytest.raises(OSError, match="checksum|CRC"):
        read_table("metrics", path)
    with pytest.raises(OSError, match="checksum|CRC"):
        open_dataset("metrics", path).to_table()
