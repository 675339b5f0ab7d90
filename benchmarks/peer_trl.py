"""herl against TRL's GRPOTrainer on the same work: seconds per iteration by part, peak
memory, start-up, and how fast each learns.

    pip install 'herl[peer]'        # TRL 1.16, only for this script
    python benchmarks/peer_trl.py [--config schemas/presets/smollm2_learn.toml]
                                  [--iterations 10] [--systems trl,herl-transformers,herl-vllm]
                                  [--rounds 1] [--out benchmarks/results/peer_trl] [--set KEY=VALUE ...]

One iteration is the same work in each: the config's `prompts_per_iteration` prompts (the
same prompts, in the same order: herl's training stream for the config's seed), `rollout.n`
answers each of up to `rollout.max_tokens` tokens at `rollout.temperature`, graded by
herl's grader (TRL's reward function calls it), then `train.mini_batches` optimizer steps
of plain GRPO (herl's `algorithm = grpo`, no hindsight) with the same LoRA, learning rate,
clipping, gradient clipping, weight decay and loss aggregation. Each system runs in a
process of its own (`--one SYSTEM`), one after the other, `--rounds` times in turn
(trl, herl-transformers, herl-vllm, herl-transformers-exit, then again), so the
machine's drift falls on all. herl-transformers-exit is herl with a train job per
iteration (`train.between_iterations = exit`): the resident trainer's "before".

Settings that cannot be matched (printed in results.md too):
  - sampling: the same distribution, different random draws (each system's own seeding);
  - TRL's old log-probs: with 2 optimizer steps per generation TRL computes them in a
    pass over all answers (its `gradient_accumulation_steps % steps_per_generation != 0`
    branch); herl takes the first mini-batch's from its own forward (train.ppo_epochs = 1);
  - advantages: TRL divides by (std + 1e-4), herl by (std + train.adv_eps);
  - loss: herl's token_mean (tokens of the mini-batch) is TRL's `dapo`; seq_mean_token_mean
    is `grpo`; dr_grpo is `dr_grpo`;
  - TRL has no LoRA adapter reference switch (beta = 0 here, so no reference is used);
  - vLLM: TRL's `use_vllm` needs CUDA; its rows use transformers' generate only.

Per iteration: generation (herl: the rollout stage; TRL: its `_generate`), grading (herl:
the grade stage; TRL: the reward function), training (herl: advantages + train stages;
TRL: the rest of its two optimizer steps, old log-prob pass included) and the wall time.
Iteration 0 includes start-up costs (herl: the engine's and trainer's start; TRL: none,
they come before its first step and are reported as start-up). Peak memory is the largest
sum of resident memory over the system's process tree (sampled every 0.2 s).

Writes OUT/results.json (every iteration of every run) and OUT/results.md (the tables,
with the machine's load before each run), and prints results.md. Each finished run's
numbers are kept in WORK/SYSTEM-ROUND.json: run again, and only the missing runs run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SYSTEMS = ("trl", "herl-transformers", "herl-vllm", "herl-transformers-exit")
# system -> (rollout.engine, train.between_iterations); -exit: a train job per iteration (the
# resident trainer's "before", on the same work)
HERL = {"herl-transformers": ("transformers", "auto"), "herl-vllm": ("vllm", "auto"),
        "herl-transformers-exit": ("transformers", "exit")}
# the train stage's own breakdown (its metrics), and the rollout's, per iteration
DETAIL = {("train", "job_overhead_seconds"): "job start + exit", ("train", "load_seconds"): "load",
          ("train", "sequences_seconds"): "batch", ("train", "old_logprob_pass_seconds"): "old log-probs",
          ("train", "optimizer_steps_seconds"): "optimizer steps", ("train", "save_seconds"): "save",
          ("train", "seal_seconds"): "seal", ("rollout", "generation_seconds"): "generate",
          ("rollout", "engine_weight_sync_seconds"): "weights to engine"}
LOSS_TYPES = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "dr_grpo": "dr_grpo"}


class TreeMemory:
    """The peak of the summed resident memory of this process and its descendants."""

    def __init__(self, every: float = 0.2):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 1e9


def load_cfg(config: str, overrides: list[str], iterations: int, engine: str, between: str = "auto"):
    from schemas.config import load_config, parse_overrides

    sets = parse_overrides(overrides)
    sets.update({"algorithm": "grpo", "iterations": iterations, "rollout.engine": engine,
                 "train.between_iterations": between, "evaluation.every": 0, "tracking.report_to": []})
    return load_config(Path(config), sets)


def prompt_stream(cfg) -> list[list[dict]]:
    """Iteration k's prompts as herl samples them (the rollout stage's order)."""
    from herl.data.pool import sample_for_iteration, training_pool

    pool, _ = training_pool(cfg)
    return [sample_for_iteration(pool, k, cfg.task.prompts_per_iteration, cfg.seed) for k in range(cfg.iterations)]


def grade(cfg, prompts: list[dict], answers: list[str], k: int, cache: Path) -> list[float]:
    """herl's rewards for (prompt, answer) pairs, as its grade stage computes them."""
    from herl.grading.rubric import grade_samples

    by_id = {p["prompt_id"]: p for p in prompts}
    samples = [(f"a{i}", p["prompt_id"], a) for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]
    _, scores, _ = grade_samples("peer", cache, k, by_id, samples, cfg.grade)
    return [scores[f"a{i}"]["reward"] for i in range(len(samples))]


# ---- herl ----------------------------------------------------------------------------


def run_herl(cfg, out: Path) -> dict:
    t_start = time.perf_counter()
    from herl.runs.rundir import open_run
    from stages import run_named_stage
    from stages.train import release_trainer

    run = open_run(cfg, out / "run")
    startup = time.perf_counter() - t_start  # imports and the run folder; the engine and trainer start in iteration 0
    rows = []
    with run.lock():
        try:
            for k in range(cfg.iterations):
                t0 = time.perf_counter()
                seconds = {}
                for stage in cfg.iteration_stages(k):
                    t = time.perf_counter()
                    run_named_stage(stage, run, k)
                    seconds[stage] = time.perf_counter() - t
                wall = time.perf_counter() - t0
                metrics = {(s, n): v for s, n, v in run.metric_rows(k)}
                rows.append({
                    "iteration": k, "wall": wall, "generation": seconds.get("rollout", 0.0),
                    "grading": seconds.get("grade", 0.0),
                    "training": seconds.get("advantages", 0.0) + seconds.get("train", 0.0),
                    "engine_start": metrics.get(("rollout", "engine_startup_seconds"), 0.0),
                    "trainer_start": metrics.get(("train", "job_overhead_seconds"), 0.0)
                    if metrics.get(("train", "trainer_started")) else 0.0,
                    "old_logprob_pass": metrics.get(("train", "old_logprob_pass_seconds"), 0.0),
                    "mean_reward": metrics[("grade", "mean_reward")],
                    "detail": {label: metrics.get(key, 0.0) for key, label in DETAIL.items()}})
                print(f"  iteration {k}: {wall:.1f} s, reward {rows[-1]['mean_reward']:.3f}", flush=True)
        finally:
            release_trainer(run)
            from herl.generation.engines import release_engines

            release_engines()
    return {"startup": startup, "iterations": rows}


# ---- TRL -----------------------------------------------------------------------------


def run_trl(cfg, out: Path) -> dict:
    t_start = time.perf_counter()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from herl.models.paths import resolve_model_path

    t, r = cfg.train, cfg.rollout
    stream = prompt_stream(cfg)
    per_iter = len(stream[0])
    flat = [p for batch in stream for p in batch]
    data = Dataset.from_list([{"prompt": p["messages"], "rubric": json.dumps(p["rubric"]), "prompt_id": p["prompt_id"]}
                              for p in flat])
    by_id = {p["prompt_id"]: p for p in flat}
    answers_per_step = per_iter * r.n // t.mini_batches  # one optimizer step: one herl mini-batch
    micro = min(t.micro_batch_size, answers_per_step)
    timing = {"generation": [], "grading": [], "rewards": []}
    cache = out / "judge_cache.sqlite"

    def reward(prompts, completions, prompt_id, **_):
        t0 = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = grade(cfg, [by_id[i] for i in prompt_id], texts, len(timing["rewards"]), cache)
        timing["grading"].append(time.perf_counter() - t0)
        timing["rewards"].append(sum(rewards) / len(rewards))
        return rewards

    args = GRPOConfig(
        output_dir=str(out / "trl"), seed=cfg.seed, report_to=[], logging_steps=1, save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=False, fp16=False,
        num_generations=r.n, max_completion_length=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
        top_k=0, per_device_train_batch_size=micro, gradient_accumulation_steps=answers_per_step // micro,
        steps_per_generation=per_iter * r.n // micro, num_iterations=t.ppo_epochs, shuffle_dataset=False,
        learning_rate=t.learning_rate, lr_scheduler_type="constant", warmup_steps=0, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, beta=t.kl_coef, epsilon=t.clip_eps_low, epsilon_high=t.clip_eps_high,
        loss_type=LOSS_TYPES[t.loss_aggregation], scale_rewards="group" if cfg.advantages.std_normalize else "none",
        max_steps=cfg.iterations * t.mini_batches, dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=t.gradient_checkpointing,
    )
    path = resolve_model_path(cfg.model.path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lora = None
    if t.lora.rank:
        lora = LoraConfig(r=t.lora.rank, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                          target_modules=t.lora.target_modules, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tokenizer, peft_config=lora)
    generate = trainer._generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        result = generate(*a, **kw)
        timing["generation"].append(time.perf_counter() - t0)
        return result

    trainer._generate = timed_generate
    marks: list[float] = []

    class Marks(TrainerCallback):
        def on_train_begin(self, *_, **__):
            marks.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            marks.append(time.perf_counter())

    trainer.add_callback(Marks())
    trainer.train()
    rows = []
    for k in range(cfg.iterations):
        wall = marks[(k + 1) * t.mini_batches] - marks[k * t.mini_batches]
        gen, grading = timing["generation"][k], timing["grading"][k]
        # TRL scores the answers after _generate returns (its _calculate_rewards): training is the rest
        rows.append({"iteration": k, "wall": wall, "generation": gen, "grading": grading,
                     "training": wall - gen - grading, "engine_start": 0.0, "trainer_start": 0.0,
                     "old_logprob_pass": float("nan"), "mean_reward": timing["rewards"][k]})
    return {"startup": marks[0] - t_start, "iterations": rows}


def one(system: str, args) -> dict:
    engine, between = HERL.get(system, ("transformers", "auto"))
    cfg = load_cfg(args.config, args.set or [], args.iterations, engine, between)
    out = Path(args.work) / f"{system}-{args.round}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    memory = TreeMemory()
    t0 = time.perf_counter()
    result = run_trl(cfg, out) if system == "trl" else run_herl(cfg, out)
    return {"system": system, "round": args.round, "total": time.perf_counter() - t0,
            "peak_memory_gb": memory.stop(), **result}


# ---- the comparison ------------------------------------------------------------------


def summarise(runs: list[dict], settings: str) -> str:
    lines = ["# herl against TRL on the same work", "", settings, "",
             "Seconds per iteration after the first (mean over iterations 1.., and over rounds), by part:", "",
             "| system | wall | generation | grading | training | iteration 0 | start-up | peak memory |",
             "|---|---|---|---|---|---|---|---|"]
    by = {}
    for run in runs:
        by.setdefault(run["system"], []).append(run)
    for system, rs in by.items():
        later = [it for r in rs for it in r["iterations"][1:]]
        mean = lambda key, its=later: statistics.mean(it[key] for it in its) if its else float("nan")  # noqa: E731
        first = statistics.mean(r["iterations"][0]["wall"] for r in rs)
        start = statistics.mean(r["startup"] for r in rs)
        peak = max(r["peak_memory_gb"] for r in rs)
        lines.append(f"| {system} | {mean('wall'):.1f} | {mean('generation'):.1f} | {mean('grading'):.2f} | "
                     f"{mean('training'):.1f} | {first:.1f} | {start:.1f} | {peak:.1f} GB |")
    herl = {system: rs for system, rs in by.items() if system in HERL}
    if herl:
        labels = list(DETAIL.values())
        lines += ["", "herl's stages from the inside (their metrics; seconds per iteration after the first):", "",
                  "| system | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for system, rs in herl.items():
            later = [it for r in rs for it in r["iterations"][1:]]
            cells = [statistics.mean(it["detail"][label] for it in later) if later else float("nan") for label in labels]
            lines.append(f"| {system} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    lines += ["", "Mean reward of the iteration's own answers (policy k on fresh samples), first 3 against last 3 "
              "iterations (round 1):", "", "| system | first 3 | last 3 | change |", "|---|---|---|---|"]
    for system, rs in by.items():
        its = rs[0]["iterations"]
        a = statistics.mean(it["mean_reward"] for it in its[:3])
        b = statistics.mean(it["mean_reward"] for it in its[-3:])
        lines.append(f"| {system} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    lines += ["", "Machine load (1-minute average) before each run: "
              + ", ".join(f"{r['system']} round {r['round']} {r['load']:.2f}" for r in runs), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "schemas" / "presets" / "smollm2_learn.toml"))
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peer_trl"))
    ap.add_argument("--work", default=None, help="where the runs live (default OUT/work; not results)")
    ap.add_argument("--set", action="append", help="KEY=VALUE over the config (both systems)")
    ap.add_argument("--one", choices=SYSTEMS, help=argparse.SUPPRESS)  # a single run, in this process
    ap.add_argument("--round", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.work = args.work or str(Path(args.out) / "work")
    if args.one:
        Path(args.result).write_text(json.dumps(one(args.one, args)))
        return 0
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for rnd in range(1, args.rounds + 1):
        for system in systems:
            result = Path(args.work) / f"{system}-{rnd}.json"
            result.parent.mkdir(parents=True, exist_ok=True)
            if result.exists():  # finished before this command (an interrupted benchmark resumes)
                runs.append(json.loads(result.read_text()))
                continue
            load = os.getloadavg()[0]
            print(f"{system}, round {rnd} (load {load:.2f})", flush=True)
            cmd = [sys.executable, __file__, "--one", system, "--round", str(rnd), "--result", str(result),
                   "--config", args.config, "--iterations", str(args.iterations), "--work", args.work,
                   *[x for s in args.set or [] for x in ("--set", s)]]
            subprocess.run(cmd, check=True)
            result.write_text(json.dumps({**json.loads(result.read_text()), "load": load}))
            runs.append(json.loads(result.read_text()))
    from heldout_analysis import provenance

    cfg = load_cfg(args.config, args.set or [], args.iterations, "transformers")
    t = cfg.train
    settings = (f"Config {Path(args.config).name} (algorithm grpo), {args.iterations} iterations, {args.rounds} "
                f"round(s): {cfg.task.prompts_per_iteration} prompts x {cfg.rollout.n} answers of up to "
                f"{cfg.rollout.max_tokens} tokens at T {cfg.rollout.temperature}; LoRA r{t.lora.rank}, lr "
                f"{t.learning_rate:g}, {t.mini_batches} optimizer steps, loss {t.loss_aggregation} (TRL "
                f"{LOSS_TYPES[t.loss_aggregation]}), clip {t.clip_eps_low}/{t.clip_eps_high}, grad norm "
                f"{t.max_grad_norm}, KL {t.kl_coef}. Settings that differ: see benchmarks/peer_trl.py's docstring.")
    report = summarise(runs, settings)
    (out / "results.json").write_text(json.dumps({"provenance": provenance(sys.argv), "runs": runs}, indent=1))
    (out / "results.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
