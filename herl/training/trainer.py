"""The train job: one policy update on an iteration's batch, in its own launched processes.

    accelerate launch [--num_processes N ...] -m herl.training.trainer RUN_DIR K OUT_DIR

stages/train.py starts it (config `train.launcher`) and waits; this module loads the
snapshot, runs the update (docs/algorithm.md step 9) and writes the next snapshot's files
into OUT_DIR, a temporary folder the stage seals and renames into place, plus the
update's metrics in OUT_DIR/train_metrics.json. The run's resident trainer
(herl/trainer_service) keeps the same Trainer for every iteration. With N processes each
takes a share of
every mini-batch (the gradients are all-reduced by accelerate's DDP, FSDP or DeepSpeed
wrapper); the loss is still normalised by the whole mini-batch's tokens, so 1 and N
processes make the same update.

With train.lora.rank > 0 only a LoRA adapter (peft) is trained on the frozen initial
policy; the snapshot is then the adapter, and the KL reference is the same model with its
adapter switched off (no second copy of the weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

from herl.models.lora import is_adapter
from herl.models.snapshot import OPTIMIZER_FILE, optimizer_unsealed, write_deferred_optimizer
from herl.training.batching import (
    Prepared,
    ResponseLogprobs,
    Sequences,
    load_sequences,
    micro_batches,
    shares,
)
from herl.training.loss import LossTotals, loss_denominators, policy_loss, truncated_is_weight
from herl.util.procs import die_with_parent, peak_rss_gb
from schemas.config import TrainConfig
from schemas.errors import disk_error, no_space, out_of_space

METRICS_FILE = "train_metrics.json"  # written into OUT_DIR by the main process, taken out by the stage
ERROR_FILE = "train_error.txt"  # why the update was refused (a non-finite loss, gradient or weight)


class NonFiniteUpdate(RuntimeError):
    """The loss, the gradient norm or the updated weights are not finite: no snapshot."""


def train_seed(run_seed: int, k: int) -> int:
    """The seed of iteration k's update (mini-batch order, LoRA initialisation, dropout)."""
    return int(hashlib.sha256(f"{run_seed}:{k}:train".encode()).hexdigest()[:8], 16)


def _policy(model):
    """The causal LM inside the distributed wrapper and ResponseLogprobs."""
    model = getattr(model, "module", model)  # DDP / DeepSpeed / accelerate wrappers
    return model.model if isinstance(model, ResponseLogprobs) else model


def _prepare(model, seqs: Sequences, mine: list[int], cfg: TrainConfig, pad_id: int, ref_model,
             adapter_reference: bool, totals: LossTotals, old_later: frozenset[int] = frozenset()) -> Prepared:
    """Old log-probs (the snapshot as loaded: the behaviour policy of the rollouts), the
    reference's and the truncated IS weights of the sequences `mine`, once per update.
    Sequences in `old_later` get their old log-probs from the first update's own forward
    (see train_on_batch): no pass here unless the reference needs one."""
    prep = Prepared()
    model.eval()
    with torch.no_grad():
        for chunk in micro_batches(mine, seqs.lengths, cfg.micro_batch_size, cfg.micro_batch_tokens):
            old_chunk = [i for i in chunk if i not in old_later]
            if old_chunk:
                lp, m = seqs.logprobs(model, old_chunk, pad_id)  # (B, R)
                n = m.sum(dim=1).tolist()
                prep.old.update((i, lp[b, : n[b]].cpu()) for b, i in enumerate(old_chunk))
                if cfg.is_correction == "truncated":
                    engine_lp, usable = seqs.engine_logprobs_of(old_chunk, lp.size(1), lp.dtype, lp.device)
                    w, stats = truncated_is_weight(lp, engine_lp, usable, m, cfg.is_cap)
                    prep.is_weight.update((i, w[b, : n[b]].cpu()) for b, i in enumerate(old_chunk))
                    totals.add_is(stats)
            if ref_model is not None or adapter_reference:
                # LoRA: the initial policy is the same weights with the adapter switched off
                ctx = _policy(model).disable_adapter() if adapter_reference else contextlib.nullcontext()
                with ctx:
                    rl, rm = seqs.logprobs(model if adapter_reference else ref_model, chunk, pad_id)
                rn = rm.sum(dim=1).tolist()
                prep.ref.update((i, rl[b, : rn[b]].cpu()) for b, i in enumerate(chunk))
    return prep


def minibatches(groups: dict[str, list[int]], seed: int, epoch: int, n_mb: int, lengths: list[int]) -> list[list[int]]:
    """Epoch `epoch`'s mini-batches: whole groups dealt round-robin from a seeded shuffle,
    each mini-batch's sequences sorted by length."""
    group_order = sorted(groups)
    random.Random(f"{seed}:{epoch}").shuffle(group_order)
    return [sorted((i for pid in group_order[j::n_mb] for i in groups[pid]), key=lambda i: lengths[i])
            for j in range(n_mb)]


def _first_minibatch(groups: dict[str, list[int]], seed: int, n_mb: int, lengths: list[int]) -> list[int]:
    """The sequences of epoch 0's first mini-batch (trained before any update)."""
    return minibatches(groups, seed, 0, n_mb, lengths)[0]


def train_on_batch(model, optimizer, accelerator, batch: Sequences | list[dict], cfg: TrainConfig, seed: int,
                   pad_id: int, ref_model=None, norm_length: int | None = None,
                   adapter_reference: bool = False) -> dict[str, float]:
    """One iteration's update: old log-probs, then ppo_epochs x mini_batches optimizer steps.

    Every process calls this with the whole batch and works on its share. norm_length: the
    constant of loss_aggregation = dr_grpo (the answer budget); None takes
    the batch's longest response. adapter_reference: the KL reference is `model` with its
    LoRA adapter disabled (instead of a `ref_model`)."""
    seqs = batch if isinstance(batch, Sequences) else Sequences.from_rows(batch)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro, budget = cfg.micro_batch_size, cfg.micro_batch_tokens
    norm_length = norm_length or max(seqs.response_length(i) for i in range(len(seqs)))
    use_ref = cfg.kl_coef > 0 and (ref_model is not None or adapter_reference)
    totals = LossTotals()

    # sequences sorted by length, so a micro-batch pads short rollouts to short lengths only
    order = sorted(range(len(seqs)), key=lambda i: seqs.lengths[i])
    groups: dict[str, list[int]] = {}
    for i in order:
        groups.setdefault(seqs.prompt_id[i], []).append(i)
    n_mb = min(cfg.mini_batches, len(groups))  # a mini-batch holds whole groups
    # With one epoch, the first mini-batch is trained before any update: its old log-probs
    # are the policy's own, taken from its forward (detached) instead of a pass here, as
    # TRL's GRPOTrainer does when num_iterations == 1. Not with truncated IS weights (they
    # need the old log-probs before the loss).
    reuse = cfg.ppo_epochs == 1 and cfg.is_correction != "truncated"
    old_later = frozenset(_first_minibatch(groups, seed, n_mb, seqs.lengths) if reuse else ())
    t_prepare = time.perf_counter()
    prep = _prepare(model, seqs, shares(order, world)[rank], cfg, pad_id, ref_model if use_ref else None,
                    adapter_reference and use_ref, totals, old_later)
    prepare_seconds = time.perf_counter() - t_prepare  # the old (and reference) log-prob pass
    if world > 1:  # every process needs every sequence's: mini-batches are re-dealt each epoch
        from accelerate.utils import gather_object

        for part in gather_object([prep]):
            prep.update(part)

    model.train()
    steps, grad_norm = 0, 0.0
    t_steps = time.perf_counter()
    from herl.util.progress import Progress

    total_steps = cfg.ppo_epochs * n_mb
    # one process draws the line (the others would repeat it)
    progress = Progress("train", total_steps if accelerator.is_main_process else 0, "optimizer steps")
    for epoch in range(cfg.ppo_epochs):
        for mb_index, mb in enumerate(minibatches(groups, seed, epoch, n_mb, seqs.lengths)):
            mb_lengths = [seqs.response_length(i) for i in mb]
            # every process runs as many forward/backward passes (gradients are all-reduced
            # on the last one): a process with fewer micro-batches pads with zero-loss ones
            per_rank = [micro_batches(s, seqs.lengths, micro, budget) for s in shares(mb, world)]
            mine = per_rank[rank]
            n_micro = max(len(c) for c in per_rank)
            for j in range(n_micro):
                chunk, dummy = (mine[j], False) if j < len(mine) else ([mb[0]], True)
                sync = contextlib.nullcontext() if j == n_micro - 1 else accelerator.no_sync(model)
                with sync:
                    parts = _micro_step(model, seqs, chunk, prep, cfg, pad_id, mb_lengths, norm_length, use_ref)
                    # DDP / FSDP / DeepSpeed average gradients over processes; the loss is a
                    # share of a sum over the whole mini-batch, so undo the average
                    accelerator.backward(parts.loss * (0.0 if dummy else float(world)))
                if not dummy:
                    totals.add(parts)
            norm = _clip(model, accelerator, cfg.max_grad_norm)  # None: DeepSpeed clips inside its engine
            where = f"epoch {epoch}, mini-batch {mb_index} (optimizer step {steps + 1})"
            if not math.isfinite(totals.loss) or (norm is not None and not math.isfinite(norm)):
                raise NonFiniteUpdate(f"the loss ({totals.loss:g} so far) or the gradient norm ({norm}) is "
                                      f"not finite at {where}")
            grad_norm += float("nan") if norm is None else norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad):
                raise NonFiniteUpdate(f"the weights are not finite after {where} (learning rate {cfg.learning_rate:g})")
            steps += 1
            progress.update(1, loss=totals.loss / steps)
    progress.close()
    steps_seconds = time.perf_counter() - t_steps
    totals = _sum_over_processes(accelerator, totals)
    tokens = int(totals.on_tokens + totals.hindsight_tokens)
    return {
        **totals.metrics(steps),
        "grad_norm": grad_norm / steps,
        "optimizer_steps": steps,
        "old_logprob_pass_sequences": len(seqs) - len(old_later),
        "old_logprob_pass_seconds": prepare_seconds,
        "optimizer_steps_seconds": steps_seconds,
        "tokens": tokens // cfg.ppo_epochs,
        "sequences": len(seqs),
        "processes": world,
    }


def _micro_step(model, seqs: Sequences, chunk: list[int], prep: Prepared, cfg: TrainConfig, pad_id: int,
                mb_lengths: list[int], norm_length: int, use_ref: bool):
    """Forward one micro-batch and return its LossParts (loss a share of the mini-batch's)."""
    logp, mask = seqs.logprobs(model, chunk, pad_id)  # (B, R)
    width, device = logp.size(1), logp.device
    n = mask.sum(dim=1).tolist()
    for b, i in enumerate(chunk):  # the first update's sequences: old log-probs are these, before any step
        if i not in prep.old:
            prep.old[i] = logp[b, : n[b]].detach().cpu()
    denom = loss_denominators([seqs.response_length(i) for i in chunk], mb_lengths, cfg.loss_aggregation, norm_length)
    return policy_loss(
        logp, prep.padded("old", chunk, width, device),
        torch.tensor([seqs.advantage[i] for i in chunk], device=device),
        torch.tensor([seqs.is_hindsight[i] for i in chunk], device=device), mask, cfg,
        torch.tensor(denom, device=device) if isinstance(denom, list) else denom,
        prep.padded("ref", chunk, width, device) if use_ref else None,
        prep.padded("is_weight", chunk, width, device) if cfg.is_correction == "truncated" else None,
    )


def _clip(model, accelerator, max_norm: float) -> float | None:
    """Clip the (all-reduced) gradients to max_norm (0: no clipping); returns their norm
    (None where DeepSpeed clips inside its engine and does not say)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if max_norm > 0:
        norm = accelerator.clip_grad_norm_(params, max_norm)
        return None if norm is None else float(norm)
    return float(torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for p in params if p.grad is not None)))


def _sum_over_processes(accelerator, totals: LossTotals) -> LossTotals:
    if accelerator.num_processes == 1:
        return totals
    summed = accelerator.reduce(torch.tensor(totals.as_list(), dtype=torch.float64, device=accelerator.device),
                                reduction="sum")
    return LossTotals.from_list(summed.tolist())


def precision_warning(cfg: TrainConfig) -> str | None:
    """Why this precision setting loses updates, if it does (the stage warns before launching)."""
    if cfg.pure_bf16 and cfg.learning_rate < 1e-4:
        return (f"train.pure_bf16 with learning rate {cfg.learning_rate:g}: most updates are smaller than "
                "bfloat16's precision and are lost; prefer train.mixed_precision = 'bf16'")
    return None


def load_policy(snapshot: Path, base: Path, cfg: TrainConfig, model_dtype: str, seed: int):
    """The model to train: the snapshot's full weights, or with LoRA the initial policy
    `base` plus the snapshot's adapter (a new adapter, seeded, when the snapshot is the
    base model itself)."""
    from transformers import AutoModelForCausalLM

    # master weights and AdamW state in float32 (an lr-1e-6 update is below bfloat16's
    # precision and would be lost); pure bfloat16 only when asked for by name
    dtype = torch.bfloat16 if cfg.pure_bf16 else torch.float32
    if cfg.lora.rank == 0:
        model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=dtype)
    else:
        from peft import LoraConfig, PeftModel, get_peft_model

        # the frozen base needs no master copy: it stays in model.dtype; peft keeps the
        # adapter's own weights in float32 (autocast_adapter_dtype)
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, model_dtype))
        if is_adapter(snapshot):
            model = PeftModel.from_pretrained(base_model, snapshot, is_trainable=True)
        else:
            torch.manual_seed(seed)  # the same initial adapter in every process
            lc = cfg.lora
            model = get_peft_model(base_model, LoraConfig(
                r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                task_type="CAUSAL_LM"))
    if cfg.gradient_checkpointing:  # transformers 5 renamed it; older versions have only the old name
        inner = model.get_base_model() if cfg.lora.rank else model
        enable = getattr(inner, "activation_checkpointing_enable", None) or inner.gradient_checkpointing_enable
        enable()
        inner.config.use_cache = False
        if cfg.lora.rank:  # frozen embeddings: checkpointed blocks need inputs that require grad
            inner.enable_input_require_grads()
    return model


def held_memory(model, optimizer, ref_model) -> dict[str, float]:
    """What the trainer holds, by part (GB, this process; metrics memory_*_gb, `herl
    status`): all weights (with LoRA the frozen base too), the trainable ones, their
    gradients at their peak (one per trainable weight, in its dtype; freed after each
    optimizer step), the AdamW state, and the KL reference (0 with LoRA: the adapter is
    switched off instead)."""
    def nbytes(tensors) -> float:
        return sum(t.numel() * t.element_size() for t in tensors) / 1e9

    params = list(_policy(model).parameters())
    trainable = [p for p in params if p.requires_grad]
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"memory_weights_gb": nbytes(params), "memory_trainable_gb": nbytes(trainable),
            "memory_gradients_gb": nbytes(trainable), "memory_optimizer_gb": nbytes(state),
            "memory_reference_gb": nbytes(ref_model.parameters()) if ref_model is not None else 0.0}


def peak_memory() -> dict[str, float]:
    """This process's peak resident memory (GB; it includes the libraries imported, about
    0.5 GB) and, on a GPU, the peak memory torch allocated there."""
    out = {"peak_rss_gb": peak_rss_gb()}
    if torch.cuda.is_available():
        out["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return out


class Trainer:
    """The policy, its optimizer, the KL reference and the accelerator of one run, in this
    process: `step(k, out_dir)` trains iteration k and writes snapshot k + 1 into out_dir.

    Made once per job. The one-shot job (`main`) steps once; the resident trainer
    (herl/trainer_service) keeps it for the run and steps every iteration, loading nothing
    when it already holds snapshot k (the one it wrote last), else loading snapshot k from
    disk as the one-shot job does. Either way an update starts from the same weights,
    optimizer state and seed, so both make the same snapshots, bit for bit."""

    def __init__(self, run):
        from accelerate import Accelerator

        from herl.models.tokenizer import quiet_transformers

        quiet_transformers()
        self.run, self.cfg, self.t = run, run.cfg, run.cfg.train
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=self.t.mixed_precision)
        self.model = self.optimizer = self.tokenizer = self.ref_model = None
        self.holds: int | None = None  # the iteration whose snapshot the weights and optimizer are

    def load(self, k: int) -> None:
        """Snapshot k's weights and AdamW state from disk (and the KL reference once)."""
        from herl.models.tokenizer import load_tokenizer

        t, acc = self.t, self.accelerator
        self.holds = None
        if self.model is not None:  # a reload: drop what the accelerator holds of the old ones
            self.model = self.optimizer = None
            acc.free_memory()
        snapshot, base = self.run.snapshot(k), self.run.snapshot(0)
        seed = train_seed(self.cfg.seed, k)
        torch.manual_seed(seed)
        model = load_policy(snapshot, base, t, self.cfg.model.dtype, seed)
        self.tokenizer = load_tokenizer(snapshot)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate,
                                      weight_decay=t.weight_decay)
        if optimizer_unsealed(snapshot):  # stages/train.py completes it (redoes update k - 1) first
            raise RuntimeError(f"{snapshot}'s optimizer state was deferred and never written; "
                               "resume the run: its train stage redoes the update that makes it")
        opt_state = snapshot / OPTIMIZER_FILE
        if opt_state.exists():
            optimizer.load_state_dict(torch.load(opt_state, map_location="cpu"))
        if t.kl_coef > 0 and t.lora.rank == 0 and self.ref_model is None:
            from transformers import AutoModelForCausalLM

            ref = AutoModelForCausalLM.from_pretrained(base, dtype=next(model.parameters()).dtype).eval()
            self.ref_model = acc.prepare_model(ref, evaluation_mode=True)
        # wrapped so that the lean log-prob path is the forward the distributed wrapper sees
        self.model, self.optimizer = acc.prepare(ResponseLogprobs(model), optimizer)
        self.holds = k

    def step(self, k: int, out_dir: Path, defer_optimizer: bool = False) -> int:
        """Train iteration k and write snapshot k + 1's files and the metrics into out_dir;
        returns the job's exit code (0, NONFINITE_EXIT, DISK_FULL_EXIT). defer_optimizer:
        leave the AdamW state out (the resident trainer writes it into the sealed snapshot
        with `write_optimizer` while the next rollout runs)."""
        t, acc, run = self.t, self.accelerator, self.run
        t0 = time.perf_counter()
        loaded = self.holds != k
        if loaded:
            self.load(k)
        seed = train_seed(self.cfg.seed, k)
        torch.manual_seed(seed)  # as the one-shot job: seeded right before its update
        load_seconds = time.perf_counter() - t0  # accelerate, the model, its optimizer state (0: held)
        sequences = load_sequences(run, k)
        assert self.tokenizer is not None  # load() made it
        t_update = time.perf_counter()
        self.holds = None  # from here until the snapshot is written, memory is neither k nor k + 1
        try:
            metrics = train_on_batch(self.model, self.optimizer, acc, sequences, t, seed,
                                     self.tokenizer.pad_token_id, self.ref_model,
                                     norm_length=max(self.cfg.rollout.max_tokens, self.cfg.hindsight.max_tokens or 0),
                                     adapter_reference=t.lora.rank > 0)
        except NonFiniteUpdate as exc:
            message = (f"iteration {k}: {exc}; no snapshot was saved. Lower train.learning_rate (now "
                       f"{t.learning_rate:g}) or train.max_grad_norm, then resume")
            print(f"herl.training.trainer: {message}", file=sys.stderr, flush=True)
            if acc.is_main_process:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / ERROR_FILE).write_text(message)
            return NONFINITE_EXIT
        metrics["update_seconds"] = time.perf_counter() - t_update
        metrics["tokens_per_second"] = metrics["tokens"] * t.ppo_epochs / metrics["update_seconds"]
        metrics["load_seconds"] = load_seconds
        metrics["loaded_from_disk"] = float(loaded)  # 0: the resident trainer held snapshot k
        metrics["optimizer_deferred"] = float(defer_optimizer)  # 1: written after the stage returned
        metrics["hindsight_prompts_trimmed"] = sequences.prompts_trimmed  # hindsight.max_train_prompt_tokens
        metrics["sequences_seconds"] = t_update - t0 - load_seconds  # the batch's token lists, joined
        metrics.update(peak_memory())
        metrics.update(held_memory(self.model, self.optimizer, self.ref_model))
        t_save = time.perf_counter()

        # every process takes part in gathering a sharded model's weights; the main one writes
        state = {name.removeprefix("model."): value for name, value in acc.get_state_dict(self.model).items()}
        assert self.optimizer is not None  # load() made it
        optim_state = None if defer_optimizer else self.optimizer.state_dict()
        code = 0
        if acc.is_main_process:
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                _policy(acc.unwrap_model(self.model)).save_pretrained(out_dir, state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(out_dir)
                if optim_state is not None:
                    torch.save(optim_state, out_dir / OPTIMIZER_FILE)
            except Exception as exc:
                # torch reports a full disk as "[enforce fail at inline_container.cc] unexpected pos",
                # safetensors as its own SafetensorError ("I/O error: No space left on device")
                disk_like = isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError"
                if not disk_like or (disk_error(exc) is None and not out_of_space(out_dir)):
                    raise
                print(f"herl.training.trainer: {disk_error(exc, out_dir) or no_space(out_dir)}", file=sys.stderr,
                      flush=True)
                code = DISK_FULL_EXIT
            if code == 0:
                metrics["save_seconds"] = time.perf_counter() - t_save
                metrics["seconds"] = time.perf_counter() - t0
                metrics["learning_rate"] = t.learning_rate
                tmp = out_dir / (METRICS_FILE + ".tmp")
                tmp.write_text(json.dumps(metrics))
                os.replace(tmp, out_dir / METRICS_FILE)
        acc.wait_for_everyone()
        # the weights and optimizer in memory are snapshot k + 1's; the stage seals them
        # into place (a stage that fails after this asks for k again: then they are reloaded)
        self.holds = k + 1 if code == 0 else None
        return code

    def write_optimizer(self, folder: Path) -> None:
        """Write the AdamW state of the snapshot this trainer holds into its sealed folder
        (after step(..., defer_optimizer=True)); every process takes part, the main one writes."""
        assert self.optimizer is not None
        state = self.optimizer.state_dict()
        if self.accelerator.is_main_process:
            write_deferred_optimizer(folder, lambda path: torch.save(state, path))
        self.accelerator.wait_for_everyone()

    def offload(self, to_host: bool) -> None:
        """Move the parameters, gradients and AdamW state to host memory (to_host) or back to
        the accelerator (train.between_iterations = offload, while the engine generates).
        A no-op on CPUs, and for FSDP / DeepSpeed, which place their shards themselves."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if (self.model is None or not torch.cuda.is_available()
                or acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)):
            return
        device = torch.device("cpu") if to_host else acc.device
        self.model.to(device)
        assert self.optimizer is not None
        for state in self.optimizer.state.values():
            for name, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[name] = value.to(device, non_blocking=True)
        if to_host:
            torch.cuda.empty_cache()

    def close(self) -> None:
        self.accelerator.end_training()


def main(argv: list[str] | None = None) -> int:
    from herl.runs.rundir import load_run

    die_with_parent(signal.SIGKILL)  # the launcher's (or the stage's) death ends this worker
    run_dir, k_arg, out_arg = (argv or sys.argv[1:])[:3]
    trainer = Trainer(load_run(run_dir))
    code = trainer.step(int(k_arg), Path(out_arg))
    if code == 0:
        trainer.close()
    return code


DISK_FULL_EXIT = 28  # the job's exit code when the snapshot did not fit on the disk (ENOSPC's number)
NONFINITE_EXIT = 65  # the job's exit code when the update was refused (ERROR_FILE says why)


def run_job(run_dir: str, k: int, out_dir: str, progress: bool = False) -> None:
    """The job as a forked child (stages/train.py, one process): its own process group, so
    the stage can stop it and whatever it starts; its exit code is main's. `progress`:
    whether the stage's process shows progress lines (herl.util.progress.enabled there)."""
    os.setsid()
    os.environ["HERL_PROGRESS"] = "1" if progress else "0"
    code = main([run_dir, str(k), out_dir])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
