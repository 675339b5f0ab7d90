"""The five stages on the real tiny model, without Prefect: tables, keys, skip/redo,
the run lock, read-only SQL, plain GRPO, and engine/trainer agreement."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from herl.generation.engines import load_engine
from herl.models.tokenizer import load_tokenizer
from herl.runs.query import query_run
from herl.runs.rundir import load_run, open_run
from herl.training.batching import load_sequences, sequence_logprobs
from schemas.config import load_config
from schemas.stages import STAGES
from schemas.tables import TABLES, read_table, write_table
from stages import rollout, run_iteration
from tests.helpers import ROOT, small_overrides


def run_iterations(run, iterations):
    """Every stage of iterations 0..iterations-1 in plan order (schemas/stages.py); their manifests."""
    return [m for k in range(iterations) for m in run_iteration(run, k).values()]


def test_every_table_for_every_iteration_with_unique_keys(done_run):
    run = done_run
    for k in range(2):
        for name, spec in TABLES.items():
            if name.startswith("heldout_"):  # only where the held-out evaluation runs (tests/unit/test_heldout.py)
                assert not run.table(k, name).exists()
            elif spec.per_stage:
                for stage in STAGES:
                    assert run.table(k, name, stage).exists()
            else:
                assert run.table(k, name).exists(), f"iter {k} {name}"
    for name, spec in TABLES.items():
        keys = ", ".join(spec.key)
        dup = query_run(run.path, f"SELECT {keys}, count(*) FROM {name} GROUP BY ALL HAVING count(*) > 1").fetchall()
        assert dup == [], f"duplicate keys in {name}"
    cfg = run.cfg
    n_rollouts = query_run(run.path, "SELECT iteration, count(*) FROM rollouts GROUP BY 1 ORDER BY 1").fetchall()
    assert n_rollouts == [(0, 16), (1, 16)]  # 4 prompts x G = 4
    # one verdict per (rollout, rubric item)
    expected = query_run(run.path, "SELECT sum(len(rubric)) * 4 FROM prompts").fetchall()[0][0]
    assert query_run(run.path, "SELECT count(*) FROM verdicts").fetchall()[0][0] == expected
    # the mixed groups keep their size G
    sizes = query_run(run.path, "SELECT DISTINCT count(*) FROM batch GROUP BY iteration, prompt_id").fetchall()
    assert sizes == [(cfg.rollout.n,)]
    # every row carries the run id
    assert query_run(run.path, "SELECT DISTINCT run_id FROM rewards").fetchall() == [(run.run_id,)]


def test_snapshots_are_complete_and_new(done_run):
    run = done_run
    for k in (1, 2):
        snap = run.snapshot(k)
        names = {p.name for p in snap.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "herl_snapshot.json"} <= names
        # only the newest keeps the AdamW state the next train stage continues from
        assert ("optimizer.pt" in names) == (k == 2)
    from safetensors.torch import load_file

    w0 = load_file(run.snapshot(0) / "model.safetensors")
    w1 = load_file(run.snapshot(1) / "model.safetensors")
    assert any(not torch.equal(w0[n], w1[n]) for n in w0)
    # rollouts of iteration 1 were sampled from policy-1
    ids = query_run(run.path, "SELECT DISTINCT iteration, snapshot_id FROM rollouts ORDER BY 1").fetchall()
    assert ids[1][1] == run.snapshot_id(1) and ids[0][1] != ids[1][1]
    assert not list(run.path.glob("snapshots/.policy-*")) and not list(run.path.glob("iter-*/.*.tmp"))


def test_rerun_skips_and_changes_redo_only_what_depends_on_them(done_run, tmp_path):
    # on a copy: the shared run stays as the other tests expect it (and a moved run resumes)
    shutil.copytree(done_run.path, tmp_path / done_run.path.name)
    run = load_run(tmp_path / done_run.path.name)
    assert all(m["skipped"] for m in run_iterations(run, 2))

    # a train-only config change redoes train 0, and through policy-1 everything of iteration 1
    cfg2 = run.cfg.model_copy(update={"train": run.cfg.train.model_copy(update={"learning_rate": 1e-3})})
    run2 = load_run(run.path)
    run2.cfg = cfg2
    results = {(m["iteration"], m["stage"]): m["skipped"] for m in run_iterations(run2, 2)}
    assert results[(0, "rollout")] and results[(0, "advantages")]
    assert not results[(0, "train")]
    assert not any(results[(1, s)] for s in STAGES)

    # a deleted output is noticed and only that stage reruns; it rewrites the same bytes
    # (SQL over the same inputs), so train's input fingerprint matches and train is kept
    run2.table(1, "batch").unlink()
    results = {(m["iteration"], m["stage"]): m["skipped"] for m in run_iterations(run2, 2)}
    assert [s for (k, s), skipped in results.items() if not skipped] == ["advantages"]
    # a tampered output is detected and regenerated (same bytes again, so nothing else reruns)
    rewards = read_table("rewards", run2.table(1, "rewards"))
    write_table("rewards", rewards.slice(1), run2.table(1, "rewards"))
    results = {(m["iteration"], m["stage"]): m["skipped"] for m in run_iterations(run2, 2)}
    assert [s for (k, s), skipped in results.items() if not skipped] == ["grade"]
    assert read_table("rewards", run2.table(1, "rewards")).num_rows == 16
    # a grade config change gives new rewards, so everything downstream of grade reruns
    run2.cfg = cfg2.model_copy(update={"grade": cfg2.grade.model_copy(update={"reward": "all"})})
    results = {(m["iteration"], m["stage"]): m["skipped"] for m in run_iterations(run2, 2)}
    redone = [(k, s) for (k, s), skipped in results.items() if not skipped]
    assert redone[:4] == [(0, "grade"), (0, "hindsight"), (0, "advantages"), (0, "train")]
    assert (0, "rollout") not in redone
    assert read_table("batch", run2.table(1, "batch")).num_rows == 16


def test_second_writer_gets_a_clear_error(done_run):
    with done_run.lock():
        proc = subprocess.run([sys.executable, "-m", "stages.grade", str(done_run.path), "--iteration", "0"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "RunLockedError" in proc.stderr and "being written by another process" in proc.stderr


def test_stage_runs_alone_as_a_module(done_run):
    proc = subprocess.run([sys.executable, "-m", "stages.advantages", str(done_run.path), "-k", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["skipped"] is True


def test_plain_grpo_has_no_hindsight(tmp_path):
    cfg = load_config(None, small_overrides(tmp_path, algorithm="grpo", iterations=1))
    run = open_run(cfg)
    run_iterations(run, 1)
    assert read_table("hindsight", run.table(0, "hindsight")).num_rows == 0
    kinds = set(read_table("batch", run.table(0, "batch")).column("kind").to_pylist())
    assert kinds == {"rollout"}
    # shaped rewards equal raw rewards: no bonus without hindsight
    assert query_run(run.path, "SELECT count(*) FROM batch WHERE shaped_reward <> reward").fetchall()[0][0] == 0


def test_rollouts_reproduce_and_engine_logprobs_match_trainer(tmp_path, done_run):
    cfg = load_config(None, small_overrides(tmp_path, run_id="again", iterations=1))
    run = open_run(cfg)
    rollout.run(run, 0)
    a = read_table("rollouts", run.table(0, "rollouts")).select(["rollout_id", "response_token_ids"]).to_pylist()
    b = read_table("rollouts", done_run.table(0, "rollouts")).select(["rollout_id", "response_token_ids"]).to_pylist()
    assert a == b

    rows = read_table("rollouts", run.table(0, "rollouts")).to_pylist()
    engine = load_engine("transformers", run.snapshot(0))
    tok = load_tokenizer(run.snapshot(0))
    with torch.no_grad():
        logp, mask = sequence_logprobs(engine.model, [r["prompt_token_ids"] for r in rows],
                                       [r["response_token_ids"] for r in rows], tok.pad_token_id)
    for i, r in enumerate(rows):
        n = len(r["response_token_ids"])
        assert torch.allclose(logp[i, :n], torch.tensor(r["logprobs"]), atol=1e-4)
        assert int(mask[i].sum()) == n


def test_logprobs_follow_the_sampling_temperature(tmp_path):
    """Rollouts at T = 0.7: the engine stores log-probs of logits / 0.7, the trainer takes
    them the same way, so the IS ratio pi_old / pi_engine is 1 in the first mini-batch; at
    T = 1 in the trainer (herl before) they would disagree."""
    cfg = load_config(None, small_overrides(tmp_path, iterations=1, **{
        "rollout.temperature": 0.7, "train.is_correction": "truncated", "train.is_cap": 100.0}))
    run = open_run(cfg)
    run_iteration(run, 0)
    batch = load_sequences(run, 0)
    batch = [dict(temperature=t, is_hindsight=h, prompt_token_ids=p, response_token_ids=r, engine_logprobs=e)
             for t, h, p, r, e in zip(batch.temperature, batch.is_hindsight, batch.prompt_ids, batch.response_ids,
                                      batch.engine_logprobs)]
    assert {r["temperature"] for r in batch if not r["is_hindsight"]} == {0.7}
    # kept revisions: trained at the rollout temperature (train.revision_logprob_temperature)
    assert {r["temperature"] for r in batch if r["is_hindsight"]} <= {0.7}
    m = {r["name"]: r["value"] for r in read_table("metrics", run.table(0, "metrics", "train")).to_pylist()}
    assert m["is_mean_ratio"] == pytest.approx(1.0, abs=1e-3) and m["is_truncated_fraction"] == 0.0

    rows = [r for r in batch if not r["is_hindsight"]]
    model = load_engine("transformers", run.snapshot(0)).model
    args = ([r["prompt_token_ids"] for r in rows], [r["response_token_ids"] for r in rows],
            load_tokenizer(run.snapshot(0)).pad_token_id)
    with torch.no_grad():
        at_t, mask = sequence_logprobs(model, *args, [0.7] * len(rows))
        at_1, _ = sequence_logprobs(model, *args)
    engine = torch.nn.utils.rnn.pad_sequence([torch.tensor(r["engine_logprobs"]) for r in rows], batch_first=True)
    assert float(((at_t - engine).abs() * mask).max()) < 1e-4
    assert float(((at_1 - engine).abs() * mask).max()) > 0.1


def test_bad_prompts_file_fails_the_stage_cleanly(tmp_path, capsys):
    from herl.commands.cli import main
    from herl.data.importers import PromptFileError
    from herl.data.pool import builtin_toy

    rows = builtin_toy(3, 0)
    rows[2]["messages"] = "hello"
    bad = tmp_path / "prompts.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = open_run(load_config(None, small_overrides(tmp_path / "runs", **{"task.source": str(bad)})))
    with pytest.raises(PromptFileError, match=r"prompts.jsonl line 3: field 'messages'"):
        rollout.run(run, 0)
    assert run.read_manifest(0, "rollout")["status"] == "failed"
    assert not run.table(0, "prompts").exists() and not run.table(0, "rollouts").exists()
    assert list(run.iter_dir(0).glob("*.parquet")) == []
    main(["status", str(run.path)])
    out = capsys.readouterr().out
    assert "rollout     failed" in out and "line 3: field 'messages'" in out


def test_truncated_is_correction_in_a_real_train_step(tmp_path):
    """The transformers engine's stored log-probs match the trainer's, so the importance
    ratios of a real step are ~1 and none is truncated."""
    cfg = load_config(None, small_overrides(tmp_path, iterations=1, **{"train.is_correction": "truncated"}))
    run = open_run(cfg)
    run_iterations(run, 1)
    batch = load_sequences(run, 0)
    assert all(e is not None and len(e) == len(r) for e, r in zip(batch.engine_logprobs, batch.response_ids))
    m = {r["name"]: r["value"] for r in read_table("metrics", run.table(0, "metrics", "train")).to_pylist()}
    assert m["is_mean_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert m["is_truncated_fraction"] == 0.0


