"""Importers on the real benchmark files (../shared/benchmarks), RaR, errors, and `herl grade`."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

from herl.commands.cli import main
from herl.commands.grade import grade_file
from herl.data.importers import PromptFileError, convert, load_prompts, read_records
from herl.data.pool import builtin_toy
from herl.grading.ifeval import IFEVAL_IDS
from tests.helpers import BENCHMARKS

needs_benchmarks = pytest.mark.skipif(not BENCHMARKS.exists(), reason=f"benchmark samples not found at {BENCHMARKS}")


@needs_benchmarks
def test_all_ifeval_prompts_import_and_every_id_is_graded(tmp_path):
    src = BENCHMARKS / "ifeval_input_data.jsonl"
    rows = load_prompts(src)
    assert len(rows) == 541
    assert Counter(it["kind"] for r in rows for it in r["rubric"]).keys() == set(IFEVAL_IDS)
    first = rows[0]["rubric"]
    assert first[2]["description"] == "Answer with at least 300 words."
    # grade every prompt with a response (its own text) through herl grade
    graded_in = tmp_path / "ifeval_responses.jsonl"
    with open(src) as fin, open(graded_in, "w") as fout:
        for line in fin:
            rec = json.loads(line)
            rec["response"] = rec["prompt"]
            fout.write(json.dumps(rec) + "\n")
    summary = grade_file(graded_in, tmp_path / "out.parquet")
    items = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert summary["graded_rows"] == 541 and len(items) == sum(len(r["rubric"]) for r in rows)
    assert {i["item_id"] for i in items} == set(IFEVAL_IDS)
    assert all(i["verdict_strict"] in ("met", "unmet") for i in items)  # never unknown
    m = summary["metrics"]
    assert 0 < m["prompt_level_strict"] <= m["prompt_level_loose"] <= 1
    assert m["prompt_level_strict"] <= m["instruction_level_strict"] <= m["instruction_level_loose"]


@needs_benchmarks
def test_all_healthbench_conversations_import():
    rows = load_prompts(BENCHMARKS / "healthbench_500.jsonl")
    assert len(rows) == 500
    weights = [it["weight"] for r in rows for it in r["rubric"]]
    assert min(weights) < 0 < max(weights)  # pitfalls keep their negative points
    assert all(it["kind"] == "judge" for r in rows for it in r["rubric"])
    assert max(len(r["messages"]) for r in rows) > 1  # multi-turn conversations kept whole


@needs_benchmarks
def test_all_ifbench_prompts_import_and_unknown_ids_are_named_unless_dropped(tmp_path):
    src = BENCHMARKS / "ifbench_test.jsonl"
    rows = load_prompts(src)
    assert len(rows) == 294 and rows[0]["prompt_id"] == "ifbench-0"
    assert len({it["kind"] for r in rows for it in r["rubric"]}) == 57
    # an id nobody registered is still named, and dropped only when asked
    recs = read_records(src)[:2]
    recs[1][1]["instruction_id_list"] = ["count:no_such_check"]
    with pytest.raises(PromptFileError, match=r"have no registered check: count:no_such_check \(1\)"):
        convert(recs, src)
    kept, report = convert(recs, src, drop_unsupported=True)
    assert report["dropped_prompts"] == 1 and kept[1] is None


@needs_benchmarks
def test_herl_grade_ifbench_with_responses_in_their_own_file(tmp_path, capsys):
    """IFBench's own layout: prompts with kwargs in one file, {prompt, response} in another."""
    out = tmp_path / "ifbench.parquet"
    assert main(["grade", "--input", str(BENCHMARKS / "ifbench_test.jsonl"),
                 "--responses", str(BENCHMARKS / "ifbench_sample_output.jsonl"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("prompt_level_strict", "instruction_level_strict", "prompt_level_loose", "instruction_level_loose"):
        assert name in printed
    assert "missing_responses          0" in printed
    items = pq.read_table(out).to_pylist()
    assert len(items) == 335 and {i["verdict_strict"] for i in items} == {"met", "unmet"}
    # IFBench's official evaluation of the same responses: 77/294 prompts strict; herl
    # differs on 3 words:start_verb items (tests/unit/test_ifbench.py), all three met here
    rows = pq.read_table(tmp_path / "ifbench.rows.parquet").to_pylist()
    assert sum(r["all_met_strict"] for r in rows) == 77 + 3

    # a prompt without a response follows nothing; a bad responses row is named
    few = tmp_path / "few.jsonl"
    few.write_text((BENCHMARKS / "ifbench_sample_output.jsonl").read_text().split("\n", 1)[1])
    summary = grade_file(BENCHMARKS / "ifbench_test.jsonl", tmp_path / "o2.parquet", responses_path=few)
    assert summary["metrics"]["missing_responses"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "q"}\n')
    with pytest.raises(PromptFileError, match=r"bad.jsonl line 2: field 'response'"):
        grade_file(BENCHMARKS / "ifbench_test.jsonl", tmp_path / "o3.parquet", responses_path=bad)
    assert not (tmp_path / "o3.parquet").exists()


def test_rar_json_and_jsonl(tmp_path):
    recs = [{"question": "What lowers fever?", "rubric": [
        {"title": "Essential Criteria: Paracetamol", "description": "Mentions paracetamol.", "weight": 5},
        {"title": "Pitfall Criteria: Aspirin for children", "description": "Recommends aspirin to a child.",
         "weight": "Pitfall"}]}]
    (tmp_path / "rar.json").write_text(json.dumps(recs))
    (tmp_path / "rar.jsonl").write_text(json.dumps(recs[0]) + "\n")
    for name in ("rar.json", "rar.jsonl"):
        (row,) = load_prompts(tmp_path / name)
        assert row["source"] == "rar" and [it["weight"] for it in row["rubric"]] == [5.0, -1.0]
        assert row["rubric"][0]["item_id"] == "Essential Criteria: Paracetamol"
        assert row["messages"] == [{"role": "user", "content": "What lowers fever?"}]


def test_errors_name_file_line_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
                   + "\n" + json.dumps({"key": 2, "prompt": "p", "instruction_id_list": ["length_constraints:number_words"],
                                        "kwargs": [{"num_words": 3, "relatoin": "at least"}]}) + "\n")
    with pytest.raises(PromptFileError, match=r"bad.jsonl line 2: field 'kwargs\[0\]': do not fit"):
        load_prompts(bad)
    hb = tmp_path / "hb.jsonl"
    hb.write_text(json.dumps({"prompt_id": "x", "prompt": [{"role": "user", "content": "hi"}],
                              "rubrics": [{"criterion": "ok", "points": "five"}]}) + "\n")
    with pytest.raises(PromptFileError, match=r"hb.jsonl line 1: field 'rubrics\[0\].points': must be a number"):
        load_prompts(hb)
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(PromptFileError, match="cannot tell the format"):
        load_prompts(odd)


def test_herl_grade_missing_response_writes_nothing(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
                               "kwargs": [{}], "response": "fine"}) + "\n"
                   + json.dumps({"key": 2, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
                                 "kwargs": [{}]}) + "\n")
    out = tmp_path / "out.parquet"
    assert main(["grade", "--input", str(src), "--output", str(out)]) == 2
    assert "in.jsonl line 2: field 'response'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_herl_grade_prints_ifeval_metrics(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    lines = [
        {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
         "kwargs": [{}, {}], "response": '"no commas"'},
        {"key": 2, "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
         "kwargs": [{}, {}], "response": '**"yes, commas"**'},
    ]
    src.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert main(["grade", "--input", str(src), "--output", str(tmp_path / "o.parquet")]) == 0
    out = capsys.readouterr().out
    # row 1 follows both; row 2 has a comma, and is quoted only once markdown asterisks are stripped
    assert "prompt_level_strict        0.5000" in out
    assert "instruction_level_strict   0.5000" in out
    assert "instruction_level_loose    0.7500" in out
    assert "prompt_level_loose         0.5000" in out


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_prompt_file_errors_name_file_line_field(tmp_path):
    good = builtin_toy(2, 0)
    p = tmp_path / "prompts.jsonl"
    _write_jsonl(p, good)
    assert [r["prompt_id"] for r in load_prompts(p)] == ["toy-0000", "toy-0001"]

    bad = json.loads(json.dumps(good))
    bad[1]["rubric"][0]["weight"] = "heavy"
    _write_jsonl(p, bad)
    with pytest.raises(PromptFileError, match=r"prompts.jsonl line 2: field 'rubric\[0\].weight'"):
        load_prompts(p)
    bad = json.loads(json.dumps(good))
    bad[0]["rubric"][1]["kind"] = "telepathy"
    _write_jsonl(p, bad)
    with pytest.raises(PromptFileError, match=r"line 1: field 'rubric\[1\].kind': unknown kind 'telepathy'"):
        load_prompts(p)
    _write_jsonl(p, [good[0], good[0]])
    with pytest.raises(PromptFileError, match="line 2: field 'prompt_id': duplicate"):
        load_prompts(p)
    p.write_text('{"prompt_id": \n')
    with pytest.raises(PromptFileError, match="line 1: not valid JSON"):
        load_prompts(p)


def test_hugging_face_datasets_folder_and_glob_with_column_mapping(tmp_path):
    """A TRL user's data: a `save_to_disk` DatasetDict, and Parquet shards, with their own
    column names mapped to the format's fields (task.columns)."""
    import datasets

    def herl_row(i):
        return {"id": f"q{i}", "conversation": [{"role": "user", "content": f"Say {i}."}],
                "checks": [{"item_id": "nd", "kind": "no_digits", "description": "Use no digits."}]}

    columns = {"prompt_id": "id", "messages": "conversation", "rubric": "checks"}
    folder = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([herl_row(i) for i in range(3)]),
                          "test": datasets.Dataset.from_list([herl_row(9)])}).save_to_disk(str(folder))
    rows = load_prompts(folder, columns=columns)
    assert [r["prompt_id"] for r in rows] == ["q0", "q1", "q2"] and rows[1]["messages"][0]["content"] == "Say 1."
    assert rows[0]["rubric"][0]["kind"] == "no_digits"
    assert [r["prompt_id"] for r in load_prompts(folder, columns=columns, split="test")] == ["q9"]
    with pytest.raises(PromptFileError, match="no split 'dev' .*splits: train, test"):
        load_prompts(folder, columns=columns, split="dev")
    datasets.Dataset.from_list([{"id": "q", "checks": herl_row(0)["checks"]}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(PromptFileError, match=r"bad row 0: no column 'conversation' \(task.columns maps "
                                              r"'messages' to it\); columns here: checks, id"):
        load_prompts(tmp_path / "bad", columns=columns)

    # IFBench-style rows in two Parquet shards, read as one pool through a glob
    ifeval_rows = [{"key": i, "instruction": f"Write {i} words.", "instruction_id_list": ["count:numbers"],
                    "kwargs": [{"N": 1}]} for i in range(4)]
    (tmp_path / "shards").mkdir()
    datasets.Dataset.from_list(ifeval_rows[:2]).to_parquet(str(tmp_path / "shards" / "train-0.parquet"))
    datasets.Dataset.from_list(ifeval_rows[2:]).to_parquet(str(tmp_path / "shards" / "train-1.parquet"))
    rows = load_prompts(tmp_path / "shards" / "train-*.parquet", columns={"prompt": "instruction"})
    assert len(rows) == 4 and rows[3]["messages"][0]["content"] == "Write 3 words."
    assert rows[0]["rubric"][0]["description"] == "Include exactly 1 numbers in the response."
    with pytest.raises(PromptFileError, match="no file matches"):
        load_prompts(tmp_path / "shards" / "dev-*.parquet")


def test_builtin_ifeval_is_shipped_with_its_license():
    """evaluation.source = builtin:ifeval works offline: IFEval's 541 prompts, every
    instruction a registered check, with the license notice beside them."""
    from herl.data.importers import BUILTIN_FILES, load_prompts

    rows = load_prompts("builtin:ifeval")
    assert len(rows) == 541 and {r["source"] for r in rows} == {"ifeval"}
    assert sum(len(r["rubric"]) for r in rows) == 834  # IFEval's instruction count
    notice = BUILTIN_FILES["builtin:ifeval"].parent / "IFEVAL_LICENSE.md"
    assert "Apache License, Version 2.0" in notice.read_text()


@pytest.mark.parametrize("case", ["deep", "huge", "deep-params"])
def test_pathological_rows_are_bad_input_with_their_line(tmp_path, case):
    """JSON nested 100,000 levels deep (a RecursionError traceback before) and a row larger
    than any prompt (a 200 MB one drove the pre-flight past 4 GB): one error naming the
    file and line, before the row is built."""
    import json

    from herl.data.importers import MAX_ROW_CHARS, PromptFileError, load_prompts

    ok = {"prompt_id": "a", "messages": [{"role": "user", "content": "Hi."}],
          "rubric": [{"item_id": "i", "kind": "include", "params": {"text": "hello"}}]}
    bad = {"deep": "[" * 100_000 + "]" * 100_000,
           "huge": json.dumps({**ok, "prompt_id": "b", "messages": [{"role": "user", "content": "x" * (MAX_ROW_CHARS + 1)}]}),
           "deep-params": json.dumps({**ok, "prompt_id": "b", "rubric": [
               {"item_id": "i", "kind": "include", "params": "[" * 100_000 + "]" * 100_000}]})}[case]
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(ok) + "\n" + bad + "\n")
    needle = {"deep": "nested too deeply", "huge": "more than the 16 M", "deep-params": "nested too deeply"}[case]
    with pytest.raises(PromptFileError, match=f"p.jsonl line 2: .*{needle}"):
        load_prompts(str(f))
