"""The train job (herl/training/trainer.py) as launched by the train stage: 1 and 2 processes make
the same update, LoRA adapters with the adapter-disabled KL reference, the merged copy
the engines generate from, and `herl export`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from herl.models.lora import engine_model, is_adapter
from herl.models.tokenizer import load_tokenizer
from herl.runs.rundir import open_run
from herl.training.batching import load_sequences, sequence_logprobs
from herl.training.launcher import start_job
from schemas.config import load_config
from stages import advantages, grade, hindsight, rollout, run_iteration, train
from tests.helpers import small_overrides


def _through_advantages(tmp_path, run_id="t", **extra):
    cfg = load_config(None, small_overrides(tmp_path, run_id=run_id, **{"iterations": 2, **extra}))
    run = open_run(cfg)
    for mod in (rollout, grade, hindsight, advantages):
        mod.run(run, 0)
    return run


def test_two_processes_make_the_same_update_as_one(tmp_path):
    """The same batch trained by 1 process and by 2 (gloo, each a share of every
    mini-batch, gradients all-reduced by DDP): the same next weights and metrics."""
    run = _through_advantages(tmp_path, **{"train.micro_batch_size": 3, "train.ppo_epochs": 2,
                                           "train.learning_rate": 1e-3})
    out, metrics = {}, {}
    for n in (1, 2):
        cfg = run.cfg.model_copy(deep=True)
        cfg.train.launcher.num_processes = n
        out[n] = tmp_path / f"procs-{n}"
        job, what = start_job(cfg, run.path, 0, out[n])  # n = 1: forked; n = 2: accelerate launch (torchrun)
        assert ("accelerate.commands.launch" in what) == (n == 2)
        assert job.wait(timeout=600) == 0, what
        metrics[n] = json.loads((out[n] / "train_metrics.json").read_text())
    one, two = load_file(out[1] / "model.safetensors"), load_file(out[2] / "model.safetensors")
    start = load_file(run.snapshot(0) / "model.safetensors")
    update = max(float((one[k] - start[k]).abs().max()) for k in one)
    gap = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"largest weight change {update:.3e}; largest 1-vs-2-process difference {gap:.3e}")
    assert update > 1e-4  # the update is real (4 AdamW steps at lr 1e-3) ...
    # ... and the same with two processes: float32 sums in another order, which AdamW's
    # normalised steps can magnify on near-zero gradients (measured: 2.2e-5 against 4.0e-3)
    assert gap < 0.01 * update
    assert (metrics[1]["processes"], metrics[2]["processes"]) == (1, 2)
    for key in ("tokens", "sequences", "optimizer_steps"):
        assert metrics[1][key] == metrics[2][key], key
    for key in ("loss", "loss_on_policy", "loss_hindsight", "clip_fraction", "mean_ratio", "grad_norm",
                "hindsight_token_fraction"):
        assert metrics[2][key] == pytest.approx(metrics[1][key], rel=1e-4, abs=1e-6), key


def test_lora_trains_an_adapter_with_the_base_as_kl_reference(tmp_path):
    """train.lora.rank = 8: the snapshot is an adapter (no full weights), the next rollout
    generates from base + adapter (a merged copy that differs from the base), and the KL
    reference is the base: the same model with its adapter switched off."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from herl.training.batching import load_sequences
    from herl.training.trainer import _prepare
    from schemas.tables import read_table

    run = _through_advantages(tmp_path, **{"train.lora.rank": 8, "train.lora.alpha": 16, "train.kl_coef": 0.05,
                                           "train.learning_rate": 5e-3})
    train.run(run, 0)
    snap = run.snapshot(1)
    assert is_adapter(snap) and not (snap / "model.safetensors").exists()
    adapter_bytes = (snap / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 0.5 * (run.snapshot(0) / "model.safetensors").stat().st_size
    # the adapter moved: its B matrices start at zero
    adapter = load_file(snap / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)

    rollout.run(run, 1)  # generates from the merged copy
    merged = engine_model(snap)
    assert merged != snap and merged.parent == run.path / "cache" / "merged"
    base_w, merged_w = load_file(run.snapshot(0) / "model.safetensors"), load_file(merged / "model.safetensors")
    assert any(not torch.equal(base_w[k], merged_w[k]) for k in base_w)
    rows = read_table("rollouts", run.table(1, "rollouts")).to_pylist()
    assert {r["snapshot_id"] for r in rows} == {run.snapshot_id(1)}

    # the reference log-probs are the base model's, the old ones base + adapter's
    seqs = load_sequences(run, 0)
    base = AutoModelForCausalLM.from_pretrained(run.snapshot(0))
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.snapshot(0)), snap)
    idx = list(range(min(6, len(seqs))))
    totals = dict(is_ratio_sum=0.0, is_truncated=0, is_tokens=0)
    prep = _prepare(policy, seqs, idx, run.cfg.train, 0, None, True, totals)
    with torch.no_grad():
        base_lp, mask = seqs.logprobs(base.eval(), idx, 0)
        merged_lp, _ = seqs.logprobs(AutoModelForCausalLM.from_pretrained(merged).eval(), idx, 0)
    for b, i in enumerate(idx):
        n = int(mask[b].sum())
        assert torch.allclose(prep.ref[i], base_lp[b, :n], atol=1e-5)
        assert torch.allclose(prep.old[i], merged_lp[b, :n], atol=1e-4)
    assert any(not torch.allclose(prep.ref[i], prep.old[i], atol=1e-4) for i in idx)

    for mod in (grade, hindsight, advantages, train):  # train continues the same adapter and its AdamW state
        mod.run(run, 1)
    m = {r["name"]: r["value"] for r in read_table("metrics", run.table(1, "metrics", "train")).to_pylist()}
    assert m["kl"] > 0


def test_herl_export_writes_the_final_policy_as_one_hf_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from herl.commands.cli import main as cli

    run = _through_advantages(tmp_path, **{"train.lora.rank": 4, "train.learning_rate": 5e-3, "iterations": 1})
    train.run(run, 0)
    dest = tmp_path / "exported"
    assert cli(["export", str(run.path), str(dest)]) == 0
    assert not is_adapter(dest) and (dest / "model.safetensors").exists() and (dest / "tokenizer.json").exists()
    assert not (dest / "optimizer.pt").exists()
    # a model to share: the folder and its files as a plain mkdir and write make them (umask 022 here)
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(f.stat().st_mode) for f in dest.iterdir()} == {0o666 & ~umask}
    model = AutoModelForCausalLM.from_pretrained(dest)
    merged = load_file(engine_model(run.snapshot(1)) / "model.safetensors")
    for name, p in model.state_dict().items():
        if name in merged:
            assert torch.allclose(p, merged[name]), name
    card = (dest / "README.md").read_text()
    assert f"# {run.run_id}: policy 1" in card and "rank 4, merged into the base" in card
    # exporting onto an existing folder is refused rather than mixing two models
    assert cli(["export", str(run.path), str(dest)]) == 2


def test_export_of_an_earlier_policy_carries_a_model_card(done_run, tmp_path):
    from herl.commands.cli import main as cli
    from schemas.tables import read_table

    dest = tmp_path / "policy-1"
    assert cli(["export", str(done_run.path), str(dest), "--iteration", "1"]) == 0
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "chat_template.jinja", "config.json",
                                                      "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    card = (dest / "README.md").read_text()
    train0 = {r["name"]: r["value"] for r in read_table("metrics", done_run.table(0, "metrics", "train")).to_pylist()}
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "| run id | `t` |" in card and "| base model | `builtin:tiny` |" in card
    assert "## Metrics of the iteration that made it (iteration 0)" in card
    assert f"| train | loss | {train0['loss']:.4g} |" in card
    assert f'"learning_rate": {json.dumps(done_run.cfg.train.learning_rate)}' in card  # the whole config


@pytest.mark.parametrize("name, kind", [("fsdp", "FSDP"), ("deepspeed_zero3", "DEEPSPEED"),
                                        ("multi_node", "MULTI_GPU")])
def test_shipped_accelerate_configs_load_and_reach_the_launch_command(name, kind, tmp_path):
    """The FSDP / DeepSpeed / multi-node files accelerate reads, and the command herl
    builds from them: the user's file plus herl's launcher settings on top."""
    from accelerate.commands.config.config_args import load_config_from_file

    from herl.training.launcher import launch_command
    from schemas.config import PRESETS

    path = PRESETS / "accelerate" / f"{name}.yaml"
    assert load_config_from_file(str(path)).distributed_type.name == kind
    cfg = load_config(None, {"train.launcher.accelerate_config": str(path), "train.launcher.num_processes": 4,
                             "train.mixed_precision": "bf16"})
    cmd = launch_command(cfg, tmp_path, 3, tmp_path / "out")
    assert cmd[cmd.index("--config_file") + 1] == str(path.resolve())
    assert cmd[cmd.index("--num_processes") + 1] == "4" and cmd[cmd.index("--mixed_precision") + 1] == "bf16"
    assert "--multi_gpu" not in cmd  # the file chooses the distributed type
    assert cmd[-5:] == ["-m", "herl.training.trainer", str(tmp_path), "3", str(tmp_path / "out")]


@pytest.mark.slow
def test_herl_run_with_lora_end_to_end(tmp_path):
    """`herl run --set train.lora.rank=8 --set train.kl_coef=0.05`: every iteration trains an
    adapter (MBs), the next iteration's rollouts come from base + adapter, the KL term is
    on, and `herl sql` reads the run."""
    import subprocess
    import sys

    from herl.runs.rundir import load_run
    from schemas.tables import read_table
    from tests.helpers import ROOT

    runs = tmp_path / "runs"
    sets = []
    for key, value in small_overrides(runs, **{"train.lora.rank": 8, "train.kl_coef": 0.05,
                                               "train.learning_rate": 5e-3}).items():
        if key not in ("run_id", "runs_dir", "iterations"):
            sets += ["--set", f"{key}={json.dumps(value)}"]
    res = subprocess.run([sys.executable, "-m", "herl.commands.cli", "run", "--run-id", "lora", "--runs-dir", str(runs),
                          "--iterations", "2", *sets], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = load_run(runs / "lora")
    for k in (1, 2):
        assert is_adapter(run.snapshot(k)) and not (run.snapshot(k) / "model.safetensors").exists()
    rows = read_table("rollouts", run.table(1, "rollouts")).to_pylist()
    assert {r["snapshot_id"] for r in rows} == {run.snapshot_id(1)}
    merged = run.path / "cache" / "merged"
    assert [p.name for p in merged.iterdir() if not p.name.startswith(".")] == ["policy-1"]
    kl = [r["value"] for k in (0, 1) for r in read_table("metrics", run.table(k, "metrics", "train")).to_pylist()
          if r["name"] == "kl"]
    assert kl[1] > 0  # the policy has moved away from the base (the adapter-disabled reference)


def _train_once(tmp_path, **extra):
    cfg = load_config(None, small_overrides(tmp_path, iterations=1, **{"train.learning_rate": 1e-6, **extra}))
    run = open_run(cfg)
    run_iteration(run, 0)
    before = load_file(run.snapshot(0) / "model.safetensors")
    after = load_file(run.snapshot(1) / "model.safetensors")
    # against the initial weights in the saved dtype: loading into bfloat16 rounds them first
    changed = sum(int((before[k].to(after[k].dtype) != after[k]).sum()) for k in before)
    total = sum(v.numel() for v in before.values())
    return changed / total, after


def test_a_small_update_survives_a_bfloat16_model_dtype(tmp_path):
    """model.dtype = bfloat16 with lr 1e-6: training keeps float32 master weights, so the
    update reaches the saved weights (stepping bfloat16 weights loses nearly all of it)."""
    frac, after = _train_once(tmp_path / "mixed", **{"model.dtype": "bfloat16", "train.mixed_precision": "bf16"})
    assert frac > 0.5 and all(v.dtype == torch.float32 for v in after.values())
    with pytest.warns(UserWarning, match="pure_bf16"):
        lost, after_bf16 = _train_once(tmp_path / "pure", **{"model.dtype": "bfloat16", "train.pure_bf16": True})
    print(f"changed fraction: float32 master {frac:.4f}, pure bfloat16 {lost:.4f}")
    assert lost < 0.2 * frac, (lost, frac)  # most of the update vanished below bfloat16's precision
    assert all(v.dtype == torch.bfloat16 for v in after_bf16.values())


def test_the_train_stage_with_gradient_checkpointing(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the current transformers API, not the deprecated one
        frac, _ = _train_once(tmp_path, **{"train.gradient_checkpointing": True, "train.learning_rate": 1e-4})
    assert frac > 0.5


def test_the_first_minibatch_takes_old_logprobs_from_its_own_forward(monkeypatch):
    """With one PPO epoch, epoch 0's first mini-batch is trained before any update: its old
    log-probs are the forward's own (no extra pass). Same update and loss as taking them
    from the extra pass, to 1e-6; the pass covers only the later mini-batch."""
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from herl.models.paths import resolve_model_path
    from herl.models.tokenizer import load_tokenizer
    from herl.training import trainer
    from schemas.config import TrainConfig

    path = resolve_model_path("builtin:tiny")
    pad = load_tokenizer(path).pad_token_id
    rows = [{"prompt_id": f"p{j % 4}", "prompt_token_ids": [5, 6, 7 + j], "response_token_ids": [40 + j] * (2 + j % 3),
             "advantage": [-1.0, 1.0, 0.5, -0.5][j % 4] * (1 + j // 4), "is_hindsight": j == 5,
             "engine_logprobs": None, "temperature": 1.0} for j in range(8)]
    cfg = TrainConfig(mini_batches=2, micro_batch_size=2, kl_coef=0.0)

    def update():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(path)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient itself
        metrics = trainer.train_on_batch(model, opt, Accelerator(cpu=True), [dict(r) for r in rows], cfg, 0, pad)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), metrics

    reused, m_reused = update()
    monkeypatch.setattr(trainer, "_first_minibatch", lambda *a: [])  # every old log-prob from the extra pass
    passed, m_passed = update()
    assert m_reused["old_logprob_pass_sequences"] == 4 and m_passed["old_logprob_pass_sequences"] == 8
    assert abs(m_reused["loss"] - m_passed["loss"]) < 1e-6
    assert torch.allclose(reused, passed, atol=1e-6, rtol=0)
    before = torch.cat([p.detach().flatten() for p in AutoModelForCausalLM.from_pretrained(path).parameters()])
    assert not torch.allclose(reused, before)  # it did update


def test_the_gpu_check_runs_on_a_cpu_in_a_tiny_shape(capsys):
    """benchmarks/gpu_check.py (made for a lent GPU) runs here in its `tiny` shape, so it
    cannot rot: every variant asked for gets a row with finite tokens/s for both steps."""
    import math
    import sys

    from tests.helpers import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    assert gpu_check.main(["--shapes", "tiny", "--variants", "full,lora_gc", "--sequences", "4",
                           "--prompt-tokens", "8", "--response-tokens", "8", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tiny |")]
    assert [r.split("|")[2].strip() for r in rows] == ["full", "lora_gc"], out
    for r in rows:
        herl, plain = float(r.split("|")[3]), float(r.split("|")[4])
        assert math.isfinite(herl) and herl > 0 and math.isfinite(plain) and plain > 0, r


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


@pytest.mark.parametrize("mode", ["seq_mean_token_mean", "dr_grpo"])
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
