"""The five stages on the real tiny model, without Prefect: tables, keys, skip/redo,
the run lock, read-only SQL, plain GRPO, and engine/trainer agreement."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from herl.generation.engines import load_engine
from herl.models.tokenizer import load_tokenizer
from herl.runs.query import ReadOnlyQueryError, connect_run, query_run
from herl.runs.rundir import load_run, open_run
from herl.runs.status import stage_status
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
            if name.startswith("heldout_"):  # only where the held-out evaluation runs (tests/test_heldout.py)
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


def test_init_model_builds_a_loadable_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from herl.commands.cli import main

    assert main(["init-model", str(tmp_path / "m")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.num_hidden_layers == 2
    text, ids = __import__("herl.generation.engines", fromlist=["render_chat"]).render_chat(
        load_tokenizer(tmp_path / "m"), [{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n") and len(ids) > 3


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


def test_micro_batches_respect_rows_and_padded_tokens():
    from herl.training.batching import micro_batches

    lengths = [n + 4 for n in [10] * 40 + [200] * 5]  # prompt + 4 response tokens, sorted
    rows = list(range(len(lengths)))
    assert [len(c) for c in micro_batches(rows, lengths, 32)] == [32, 13]
    chunks = micro_batches(rows, lengths, 32, max_tokens=500)
    assert sum(len(c) for c in chunks) == 45
    for c in chunks:  # every chunk within both bounds, unless a single row is longer than the budget
        longest = max(lengths[r] for r in c)
        assert len(c) <= 32 and (len(c) * longest <= 500 or len(c) == 1)
    assert [len(c) for c in chunks][-3:] == [2, 2, 1]  # the 204-token rows go two at a time


def test_token_bounded_micro_batches_give_the_same_update(done_run):
    """Splitting a mini-batch differently changes only speed: the update is the same."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from herl.training.trainer import train_on_batch

    rows = load_sequences(done_run, 0)
    snapshot = done_run.snapshot(0)
    pad = load_tokenizer(snapshot).pad_token_id
    params = []
    for budget in (None, 300):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(snapshot)
        # SGD: the update is the gradient itself (Adam would blow rounding noise on
        # near-zero gradients up to a full step of lr)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        cfg = done_run.cfg.train.model_copy(update={"micro_batch_tokens": budget})
        train_on_batch(model, opt, Accelerator(cpu=True), rows, cfg, 0, pad)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(params[0], torch.cat([p.detach().flatten() for p in
                                                 AutoModelForCausalLM.from_pretrained(snapshot).parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-5)


def test_processes_needing_the_tiny_model_at_once_share_one_build(tmp_path):
    """Parallel runs on a fresh machine: the first use of builtin:tiny builds it once, and
    every process sees the same folder (its fingerprint is recorded by the stages)."""
    import os

    code = ("from herl.models.paths import resolve_model_path; from herl.runs.rundir import fingerprint; "
            "print(fingerprint(resolve_model_path('builtin:tiny')))")
    env = {**os.environ, "HERL_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    prints = {out.strip() for out, _ in outs}
    after = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300).stdout.strip()
    assert prints == {after}


def test_truncated_is_weights_scale_on_policy_tokens_once_per_update():
    """Engine log-probs 4x less likely than the trainer's: every on-policy token's weight is
    truncated to is_cap = 2, so the first step's on-policy loss doubles; hindsight rows and
    rows with unusable engine log-probs are left alone; two PPO epochs report the same ratios."""
    import math

    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from herl.models.paths import resolve_model_path
    from herl.training.trainer import train_on_batch
    from schemas.config import TrainConfig

    path = resolve_model_path("builtin:tiny")
    tok = load_tokenizer(path)
    rows = []
    for j in range(4):
        rows.append({"prompt_id": "p", "prompt_token_ids": [5, 6, 7 + j], "response_token_ids": [40 + j, 50, 60],
                     "advantage": [-1.0, -1.0, 1.0, 1.0][j], "is_hindsight": j == 3, "engine_logprobs": None,
                     "temperature": 1.0})
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        lp, mask = sequence_logprobs(model, [r["prompt_token_ids"] for r in rows],
                                     [r["response_token_ids"] for r in rows], tok.pad_token_id)
    for r, row_lp in zip(rows, lp):
        r["engine_logprobs"] = [float(x) - math.log(4.0) for x in row_lp[:3]]
    rows[2]["engine_logprobs"] = rows[2]["engine_logprobs"][:2]  # wrong length: unusable, weight 1

    def update(correction: str, epochs: int = 1) -> dict:
        m = AutoModelForCausalLM.from_pretrained(path)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: the first step's ratios stay exactly 1
        cfg = TrainConfig(is_correction=correction, is_cap=2.0, mini_batches=1, ppo_epochs=epochs)
        return train_on_batch(m, opt, Accelerator(cpu=True), [dict(r) for r in rows], cfg, 0, tok.pad_token_id)

    plain, corrected = update("none"), update("truncated")
    # on-policy rows 0, 1 (A = -1, weight 2) and 2 (A = +1, weight 1): -A * ratio * w per token, / 12 tokens
    assert plain["loss_on_policy"] == pytest.approx((3 + 3 - 3) / 12, abs=1e-5)
    assert corrected["loss_on_policy"] == pytest.approx((2 * 3 + 2 * 3 - 3) / 12, abs=1e-5)
    assert corrected["loss_hindsight"] == pytest.approx(plain["loss_hindsight"], abs=1e-6)
    assert corrected["is_mean_ratio"] == pytest.approx(4.0, rel=1e-4)
    assert corrected["is_truncated_fraction"] == 1.0
    twice = update("truncated", epochs=2)
    assert (twice["is_mean_ratio"], twice["is_truncated_fraction"]) == pytest.approx((4.0, 1.0), rel=1e-4)


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_per_sequence_aggregation_trains_with_several_sequences_per_micro_batch(mode):
    """Both per-sequence modes with the default micro-batch of 8 (they crashed as soon as a
    micro-batch held two sequences): one update, a finite scalar loss, weights moved."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from herl.models.paths import resolve_model_path
    from herl.training.trainer import train_on_batch
    from schemas.config import TrainConfig

    path = resolve_model_path("builtin:tiny")
    tok = load_tokenizer(path)
    rows = [{"prompt_id": f"p{j % 2}", "prompt_token_ids": [5, 6, 7 + j], "response_token_ids": [40 + j] * (1 + j),
             "advantage": [-1.0, 1.0, 0.5, -0.5, 1.0, -1.0][j], "is_hindsight": j == 4, "engine_logprobs": None,
             "temperature": 1.0}
            for j in range(6)]
    model = AutoModelForCausalLM.from_pretrained(path)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = TrainConfig(loss_aggregation=mode, micro_batch_size=8, mini_batches=1)
    metrics = train_on_batch(model, opt, Accelerator(cpu=True), rows, cfg, 0, tok.pad_token_id, norm_length=8)
    assert math.isfinite(metrics["loss"]) and metrics["optimizer_steps"] == 1
    assert not torch.equal(before, torch.cat([p.detach().flatten() for p in model.parameters()]))
