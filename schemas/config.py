"""The run configuration: one typed, documented model with a section per stage.

Defaults are the reference implementation's (see docs/configuration.md);
the embedded CPU default lives in `schemas/presets/tiny.toml`. Load with `load_config`,
which reads a TOML (or the JSON a run saves), applies dotted overrides
(`{"train.learning_rate": 1e-5}`) and validates, with errors that say how to fix them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from schemas.errors import UserError, read_utf8
from schemas.stages import HELDOUT, SPECS, STAGES

PRESETS = Path(__file__).parent / "presets"
# a run id is one folder name inside runs_dir: no separators, no "..", no absolute path
RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_PROMPTS = 1_000_000
DEFAULT_CONFIG = PRESETS / "tiny.toml"


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


# query parameters that carry a secret (api_key=, token=, sig=, X-Amz-Signature=, ...)
_SECRET_PARAM = re.compile(r"(^|[_-])(api[_-]?key|key|token|secret|password|passwd|pwd|sig|signature|auth|"
                           r"authorization|access[_-]?token|credential|credentials)$", re.IGNORECASE)


def url_secret(url: str | None) -> str | None:
    """What secret a URL holds, if any: a user name or password before the host (also in
    a URL without a scheme, `user:pw@host/v1`, or with backslashes, `http:\\user:pw@host`),
    or a query parameter that names a key, token, password or signature. None: none."""
    from urllib.parse import parse_qsl

    if not url:
        return None
    text = url.strip().replace("\\", "/")
    rest = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*:/*", "", text)  # the scheme and its slashes, however many
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        return "a user name or password (user:password@host)"
    query = text.split("?", 1)[1].split("#", 1)[0] if "?" in text else ""
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if _SECRET_PARAM.search(name.strip()):
            return f"a secret in its query string ({name}=...)"
    return None


def _url_has_credentials(url: str | None) -> bool:
    return url_secret(url) is not None


def _no_secret(field: str, url: str | None, where_instead: str) -> None:
    """Refuse a URL that holds a secret: the config is stored in clear."""
    what = url_secret(url)
    if what is not None:
        raise ValueError(f"{field} holds {what}: the config is stored in config.json, Prefect and the trackers in "
                         f"clear. {where_instead}, and give the URL without it")


class _Section(BaseModel):
    # inf / nan in any float field is refused (a learning rate of inf trains an all-NaN policy)
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)


class ModelConfig(_Section):
    path: str = "builtin:tiny"
    """Initial policy: a local Hugging Face model folder; a Hub id OWNER/NAME[@REVISION] read from the Hugging Face cache (`herl init-model OWNER/NAME` fetches it; never downloaded at run time); `builtin:smollm2-135m-instruct` (installed by `herl init-model`); or `builtin:tiny` (a small random model built locally on first use)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype for generation (and the saved snapshots' reference copy for the engines). Training keeps float32 master weights unless train.pure_bf16. Use float32 on CPUs."""


class TaskConfig(_Section):
    source: str = "builtin:toy"
    """Prompt pool: `builtin:toy` (short lines with 3-5 character-level checks, generated from `seed`), `builtin:ifgen` (natural requests with 1-3 IFEval constraints, generated from `seed`; disjoint from IFEval) or a prompts file (.jsonl or .parquet; IFEval/IFBench, RaR, HealthBench or herl format), a Hugging Face `datasets` folder (`save_to_disk`) or a glob of .jsonl/.parquet files (read through `datasets`)."""
    format: Literal["auto", "herl", "ifeval", "rar", "healthbench"] = "auto"
    """Format of a prompts file: IFEval/IFBench, RaR, HealthBench or the herl prompts schema; auto detects it."""
    drop_unsupported: bool = False
    """Drop IFEval/IFBench instructions that have no registered check (else the import fails, naming them)."""
    columns: dict[str, str] = {}
    """Read each field the format expects from a column of another name, {field: column}, e.g. {prompt = "instruction"} (TRL-style column mapping; any source)."""
    split: str = "train"
    """The split to read when task.source is a `datasets` DatasetDict folder."""
    num_prompts: int = 64
    """Size of a generated pool (`builtin:toy`, `builtin:ifgen`); ignored for files."""
    prompts_per_iteration: int = 64
    """B, prompts sampled per iteration (epoch-wise without replacement) [reference: 64]."""
    holdout: int = 0
    """Prompts of the pool held out from training (a seeded choice) for the held-out evaluation (see `evaluation`); 0 trains on the whole pool."""
    epochs: float | None = None
    """Passes over the training pool; when set, the run's `iterations` is ceil(epochs x training prompts / prompts_per_iteration), counted when the run opens (after task.holdout and task.max_prompt_tokens) and stored in its config.json [reference: total_epochs, 6 instruction following, 3 medical]. None: `iterations` says."""
    max_prompt_tokens: int | None = None
    """Drop pool prompts longer than this many tokens under the model's chat template (with the generation prompt), as the reference's data.filter_overlong_prompts does [reference: data.max_prompt_length, 6144 instruction following, 4096 medical]; the rollout stage counts them (`prompts_dropped_too_long`). None keeps every prompt (one that cannot fit the model's context is refused before the run starts)."""


class VLLMConfig(_Section):
    python: str | None = None
    """Interpreter of vLLM's environment; None: $HERL_VLLM_PYTHON, this interpreter if it has vllm, else $HERL_HOME/vllm-venv/bin/python (made by `herl install-vllm`; used once finished, i.e. with its herl-vllm-ready.json; HERL_HOME defaults to ~/.cache/herl)."""
    tensor_parallel_size: int = 1
    """GPUs per engine (tensor parallel) [reference: 2]."""
    data_parallel_size: int = 1
    """Engine replicas (data parallel)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory for weights and KV cache. On CPUs the KV cache size is cpu_kvcache_gib instead."""
    cpu_kvcache_gib: int = 2
    """KV cache size on CPUs, in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE)."""
    max_model_len: int | None = None
    """Longest prompt + answer the engine plans for; None takes the model's maximum."""
    enforce_eager: bool = False
    """Skip CUDA graph capture / compilation: slower generation, faster start-up."""
    enable_chunked_prefill: bool | None = None
    """Chunked prefill; None: vLLM's default on GPUs, off on CPUs (where seeded sampling cannot resume a split prompt)."""
    timeout_s: float = 7200.0
    """Hard limit for one engine process (start-up and generation); it is killed past it."""
    between_iterations: Literal["auto", "keep", "sleep", "restart"] = "auto"
    """The engine while the train job runs; it serves the whole run, the next snapshot's weights loaded in place. keep = as it is (memory held); sleep = vLLM's sleep mode, weights and KV cache freed (GPUs); restart = closed, a fresh engine each iteration (a start costs 30-160 s on a CPU); auto = sleep on GPUs, keep on CPUs unless memory is short for the train job, then restart."""


class RolloutConfig(_Section):
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    """Generation engine for rollouts and revisions; auto = vllm where a whole vLLM environment is found and it pays off (on a GPU; on a CPU for models of 100M parameters or more, which it generated 1.3x faster at SmolLM2-135M's size, while smaller ones generate faster with transformers), else transformers."""
    n: int = 8
    """G, answers sampled per prompt (the GRPO group size) [reference: 8]."""
    temperature: float = 1.0
    """Rollout sampling temperature; 0 means greedy [reference: 1.0]."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = 0
    """Top-k sampling; 0 disables it."""
    max_tokens: int = 2048
    """Maximum generated tokens per answer [reference: 2048; 4096 for the medical setup]."""
    batch_size: int = 64
    """Sequences generated together in one batch (transformers engine)."""


class JudgeConfig(_Section):
    backend: Literal["openai", "local"] = "openai"
    """openai: an OpenAI-compatible HTTP endpoint (vllm serve, a hosted API); local: a herl engine on a local model folder."""
    model: str = "gpt-4o-mini"
    """Judge model: the served model name (openai) or a local folder / builtin:tiny (local) [reference: gpt-4o-mini]."""
    base_url: str | None = None
    """Endpoint, e.g. http://127.0.0.1:8000/v1 for `vllm serve`; None uses the openai client's default."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (read at call time, never stored)."""
    api_key_secret: str | None = None
    """Name of a Prefect Secret block holding the API key; takes precedence over api_key_env."""
    temperature: float = 0.1
    """Judge sampling temperature [reference: 0.1]."""
    max_tokens: int = 512
    """Maximum tokens of a judge reply."""
    concurrency: int = 8
    """Judge calls in flight at once (openai backend)."""
    timeout_s: float = 60.0
    """Timeout of one judge call, in seconds."""
    retries: int = 3
    """Retries of a call after a timeout, connection error, HTTP 429 or 5xx, with exponential backoff."""
    backoff_s: float = 1.0
    """First backoff; doubles with each retry."""
    parse_retries: int = 1
    """Extra calls when a reply cannot be parsed as a JSON list of 0/1 of the right length."""
    cache: bool = True
    """Cache definitive verdicts (SQLite, keyed by judge model and prompt) so a resumed stage does not pay twice."""
    local_engine: Literal["transformers", "vllm"] = "transformers"
    """Engine of the local backend (vllm uses the [vllm] section)."""
    template: Literal["herl", "reference"] = "herl"
    """Wording of the per-item judge prompt: herl (the whole conversation, the response fenced so it cannot pass as instructions, weights when any differs from 1, a JSON list reply; herl/templates/judge.j2) or reference (rar_implicit.py's system and user prompts: the user's question, rubrics with their weights, a {"results": [...]} reply; herl/templates/judge_reference.j2)."""
    probe: bool = True
    """Before a run whose prompts have judge items (or reward = implicit) starts, ask the judge four items of known answer; fewer than three answered right refuses the run, naming what the judge replied (a judge that cannot answer in the required format would leave the verdicts `unknown`). false skips the probe."""


class GradeConfig(_Section):
    mode: Literal["strict", "loose"] = "strict"
    """Which verdict rewards use: strict, or IFEval's loose (first/last line removed, asterisks stripped also tried)."""
    judge: JudgeConfig = JudgeConfig()
    """The LLM judge for items of kind `judge`."""
    reward: Literal["weighted", "fraction", "all", "implicit"] = "weighted"
    """Aggregation: weighted = sum(w*met)/sum(positive w) clipped to [0,1]; fraction = items met / items; all = 1 if every item met; implicit = the judge's holistic 1-10 score as (s-1)/9 (RaR), falling back to weighted when no score can be had."""
    unknown_policy: Literal["unmet", "drop"] = "unmet"
    """What an `unknown` verdict counts as: unmet, or dropped from the denominator. (Where grading fails outright the reference gives the whole answer reward 0; herl marks only the affected items unknown.)"""
    pitfalls: Literal["subtract", "ignore"] = "subtract"
    """Negative-weight items (pitfalls) in the weighted reward: subtract = a met pitfall costs its weight (HealthBench's scoring); ignore = weight 0, as the reference's code does."""


class HindsightConfig(_Section):
    threshold: float = 1.0
    """A group fails, and gets hindsight, when its best reward is below this [reference: 1.0]."""
    candidate_limit: int = 16
    """At most this many best-reward answers per failed group are revised [reference: 16]."""
    revisions_per_candidate: int = 1
    """Revisions generated per candidate; the best one counts for the bonus [reference: 1]."""
    temperature: float = 0.3
    """Sampling temperature for revisions [reference: 0.3]."""
    top_p: float = 1.0
    """Nucleus sampling mass for revisions."""
    max_tokens: int | None = None
    """Maximum tokens per revision; None uses rollout.max_tokens."""
    show_weights: bool = True
    """Show rubric weights in the hindsight prompt when items carry weights other than 1."""
    skip_looping: bool = True
    """The reference's repetition rule: an answer whose last 160 characters occur 3 or more times in it (rewards.looped) counts as reward 0 with no items met when candidates, the group's best and fallback copies are chosen; its training reward is unchanged. The reference applies it to instruction following (its if_score reward) and not to its medical judge reward; herl's default is on for every task, since a looping draft is a degenerate one to revise (false: the medical preset)."""
    tie_tolerance: float = 1e-6
    """Rewards closer than this are equal: a candidate ties the group's best (the reference's 1e-6), a revision ties (rather than beats) it, so 0.1 + 0.2 ties 0.3 [reference: 1e-6]."""
    max_train_prompt_tokens: int | None = None
    """Train a kept revision after at most the last this-many tokens of its hindsight prompt (left-trimmed, as the reference trims it to its prompt width, data.max_prompt_length) [reference: 6144 instruction following, 4096 medical]; the train stage counts them (`hindsight_prompts_trimmed`). None trains the whole prompt."""
    template: str = "herl"
    """Wording of the hindsight prompt: herl (sections with weights; pitfalls as mistakes), reference (the authors' constraint template, quoted in docs/algorithm.md), goals (the request again with the items the draft missed as requirements, no draft: what a small model revises best with, see docs/hindsight.md), or a path to a Jinja template of your own (variables as in herl/templates/hindsight.j2)."""
    show_draft: bool = True
    """Show the draft being revised (the paper's hindsight); false shows the request and the verdicts only (herl wording; goals never shows it)."""
    show_items: Literal["all", "unmet"] = "all"
    """Items listed: all = every item with its verdict (the paper's); unmet = only those to fix (unmet, unclear, committed pitfalls)."""
    show_details: bool = False
    """Show the grader's own detail beside each item ("412 words", "missing ['dog']"; checks give one, a judge does not)."""
    chat_template: bool = True
    """Render the hindsight prompt as a user turn under the model's chat template; false gives raw text, as the reference does (its use_chat_template defaults to false)."""
    train_prompt: Literal["hindsight", "original"] = "hindsight"
    """Prompt a kept revision is trained under: the hindsight prompt (reference `train_use_rewrite_prompt=True`) or the original one."""


class AdvantagesConfig(_Section):
    alpha: float = 0.05
    """Bonus reward weight: r <- r + alpha * (r_rev - r) for candidates (algorithm herl only) [reference: 0.05]."""
    replace_top_n: int = 1
    """Revisions mixed into each failed group, each replacing a random member [reference: 1]."""
    duplicate_best_fallback: bool = True
    """Where no revision qualifies, a copy of the group's best original fills the slot (reference behaviour)."""
    std_normalize: bool = True
    """Divide by the group's (unbiased) std; false gives Dr. GRPO's mean-centred advantages."""
    eps: float = 1e-6
    """Added to the group std before dividing."""


class LoraConfig(_Section):
    rank: int = 0
    """LoRA rank r (peft); 0 trains every weight (full fine-tune). With r > 0 a snapshot is the adapter (MBs) on the frozen initial policy."""
    alpha: float = 16.0
    """LoRA scaling alpha: the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    target_modules: list[str] | str = "all-linear"
    """Modules that get an adapter: peft's `all-linear` (every linear layer but the output head) or a list of module names, e.g. ["q_proj", "v_proj"]."""


class LauncherConfig(_Section):
    num_processes: int = 1
    """Training processes in all (accelerate launch --num_processes): one per GPU, or CPU processes over gloo."""
    num_machines: int = 1
    """Machines taking part; the same run folder (a shared file system) and config on each."""
    machine_rank: int = 0
    """This machine's rank, 0 on the main one (set per machine, e.g. with --set)."""
    main_process_ip: str | None = None
    """Address of the rank-0 machine (multi-machine only)."""
    main_process_port: int | None = None
    """Port of the rank-0 machine's rendezvous; None lets accelerate choose (29500)."""
    accelerate_config: str | None = None
    """An accelerate config YAML (`accelerate config`) where FSDP or DeepSpeed ZeRO is chosen; the fields above and train.mixed_precision override it."""
    timeout_s: float | None = None
    """Kill the training job after this many seconds (None: no limit)."""


class TrainConfig(_Section):
    learning_rate: float = 1e-6
    """AdamW learning rate [reference: 1e-6]."""
    weight_decay: float = 0.01
    """AdamW weight decay [reference: 0.01, verl's default]."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    mini_batches: int = 2
    """Optimizer steps per iteration: the batch is split into this many mini-batches of whole groups [reference: 64 prompts / PPO mini-batch 32 = 2]."""
    ppo_epochs: int = 1
    """Passes over the batch per iteration."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass; gradients accumulate over a mini-batch."""
    micro_batch_tokens: int | None = None
    """Padded tokens (sequences x longest) per forward/backward pass, on top of micro_batch_size; long hindsight sequences then get smaller micro-batches. None: only micro_batch_size bounds them."""
    clip_eps_low: float = 0.2
    """PPO clip: ratio lower bound is 1 - clip_eps_low [reference: 0.2]."""
    clip_eps_high: float = 0.2
    """PPO clip: ratio upper bound is 1 + clip_eps_high [reference: 0.2]."""
    dual_clip_c: float = 3.0
    """Dual clip bound for negative advantages; must be > 1 [reference: 3]."""
    gamma: float = 1.0
    """Policy-shaping constant for hindsight tokens, loss = -A * x / (x + gamma); <= 0 means no shaping (loss = -A * x) [reference: 1.0 instruction following; 0.1 medical]."""
    revision_logprob_temperature: Literal["rollout", "sampled"] = "rollout"
    """Temperature T of the log-probs (logits / T) of kept revisions' tokens, old, current and reference alike: rollout = rollout.temperature, the policy the rollouts sample from and the one being trained (the reference's code); sampled = hindsight.temperature, the one they were sampled at. At a low T such as 0.3 the gradient of log softmax(z / T) vanishes on every token the model is fairly sure of, so revisions would teach almost nothing."""
    hindsight_weight: Literal["ratio", "prob"] = "ratio"
    """x in the hindsight-token loss: ratio = pi_theta / pi_old (the reference's code, `use_he_logprob`); prob = pi_theta (LUFFY's policy shaping, the form the paper's text cites)."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "dr_grpo"] = "token_mean"
    """How token losses become the mini-batch loss: token_mean = sum / tokens of the mini-batch (exact; the reference takes a token mean per micro-batch and averages those); seq_mean_token_mean = mean over sequences of each one's token mean; dr_grpo = Dr. GRPO, token sums over a constant length (the answer budget max_tokens), averaged over sequences. (verl's `seq-mean-token-sum-norm` is micro_batch_size times dr_grpo: it adds the sequences' sums without dividing by their count, which changes what max_grad_norm clips; herl's earlier name for dr_grpo, seq_mean_token_sum_norm, is read as dr_grpo.)"""

    @field_validator("loss_aggregation", mode="before")
    @classmethod
    def _renamed_mode(cls, value: Any) -> Any:
        # the name this mode had before: runs saved with it resume (same arithmetic)
        return "dr_grpo" if value == "seq_mean_token_sum_norm" else value

    is_correction: Literal["none", "truncated"] = "none"
    """Importance-sampling correction for the engine/trainer log-prob gap on on-policy tokens: truncated = weight min(pi_old/pi_engine, is_cap) (TIS, as TRL and verl offer)."""
    is_cap: float = 2.0
    """Truncation bound of the importance weight."""
    keep_snapshots: int | None = 2
    """Policy snapshots kept on disk: the newest this many, plus every keep_every-th and the final one; older ones are pruned once their iteration is done (their id stays, so resume still verifies). Only the newest keeps its optimizer state. None keeps every snapshot whole."""
    keep_every: int = 10
    """Also keep every this-many-th snapshot (policy-10, policy-20, ...); 0 keeps none extra."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Compute precision through accelerate: the weights and AdamW state stay float32 (master weights) whatever model.dtype is, and forward/backward run in bf16/fp16 autocast (GPUs). "no" computes in float32."""
    pure_bf16: bool = False
    """Keep the trained weights and AdamW state themselves in bfloat16 (half the memory). Updates smaller than the weights' precision (about 1/256 of a weight) are lost: with learning rates near 1e-6 most of them. Only when asked for by name."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: less memory, about a third more compute."""
    between_iterations: Literal["auto", "keep", "offload", "exit"] = "auto"
    """The train job between train stages: keep = one resident trainer for the run (started at the first train stage; the model, optimizer, KL reference and process group stay in memory, so later iterations load nothing from disk); offload = resident, its parameters, gradients and optimizer state moved to host memory while the engine generates (GPUs; the same as keep on CPUs); exit = a job per iteration that loads snapshot k and exits after writing k + 1; auto = offload on GPUs, keep on CPUs. Updates are the same bit for bit either way."""
    kl_coef: float = 0.0
    """Coefficient of the k3 KL penalty to the initial policy; 0 skips loading a reference [reference: 0 instruction following; 0.001 medical]."""
    lora: LoraConfig = LoraConfig()
    """Train a LoRA adapter instead of every weight."""
    launcher: LauncherConfig = LauncherConfig()
    """How the training job is started (`accelerate launch`): processes, machines, FSDP/DeepSpeed. Not part of the stage's config hash: resuming with more processes does not redo finished iterations."""


class EvaluationConfig(_Section):
    every: int = 0
    """Evaluate the policy on the held-out prompts (task.holdout) every this many iterations: policies 0, every, 2*every, ... and the final one; 0 turns it off."""
    rounds: int = 1
    """Rounds of verdict-driven hindsight revision after the first answer (test-time self-improvement); 0 scores first answers only."""
    temperature: float = 0.0
    """Sampling temperature of evaluation answers and revisions; 0 means greedy."""
    max_tokens: int | None = None
    """Maximum tokens per evaluation answer; None uses rollout.max_tokens."""
    source: str | None = None
    """A prompts file evaluated instead of the pool's held-out prompts, or `builtin:ifeval` (IFEval's 541 prompts, shipped with herl, never trained on); None uses task.holdout."""
    limit: int | None = None
    """Evaluate a seeded subset of this many prompts (fits a CPU budget); None evaluates all."""


class TrackingConfig(_Section):
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = ["tensorboard"]
    """Experiment trackers that get every metric of the metrics tables, stepped by iteration, with the config as hyperparameters (TRL's `report_to`): `tensorboard` (event files in runs/<id>/tracking/tensorboard), `wandb`, `mlflow`; [] for none. wandb and mlflow need `pip install 'herl[tracking]'`."""
    project: str = "herl"
    """W&B project and MLflow experiment name."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """W&B mode: `offline` writes runs/<id>/tracking/wandb (upload later with `wandb sync`); `online` sends to the server WANDB_BASE_URL / WANDB_API_KEY name."""
    wandb_entity: str | None = None
    """W&B entity (team or user); unset: the account's default."""
    mlflow_uri: str | None = None
    """MLflow tracking URI, e.g. http://127.0.0.1:5000; unset: a file store in runs/<id>/tracking/mlruns."""
    plot_every: int = 0
    """Redraw plot.png (and its Prefect artifact) every this many iterations while the run goes; 0 draws it once, when the run ends (each redraw reads the whole run: seconds that grow with it). `herl plot RUN` draws it any time."""


class ClusterConfig(_Section):
    backend: Literal["local", "ray"] = "local"
    """Where the trainer ranks and engines run: local = processes on this machine (accelerate launch, vLLM's own parallelism); ray = Ray actors placed on a Ray cluster (`pip install 'herl[ray]'`), the flow and every table staying on this machine (the driver). See docs/scaling.md."""
    address: str = "auto"
    """The Ray cluster to join (backend = ray): `auto` (the one `ray start` made on this node, or RAY_ADDRESS), or an address such as 10.0.0.1:6379 or ray://head:10001."""
    trainer_gpus: float = 0.0
    """GPUs per trainer rank (backend = ray; train.launcher.num_processes ranks, all placed together or none); 1 on GPU clusters, 0 trains on CPUs over gloo."""
    trainer_cpus: float = 1.0
    """CPUs per trainer rank (backend = ray); also its torch threads."""
    engines: int | None = None
    """Engine actors (backend = ray), the prompts of each generation split over them and their rows merged; None: vllm.data_parallel_size. Each engine is one vLLM (or transformers) engine, with vllm.tensor_parallel_size GPUs where vLLM runs on GPUs."""
    engine_gpus: float | None = None
    """GPUs per engine actor (backend = ray); None: vllm.tensor_parallel_size on a cluster with GPUs, else 0."""
    engine_cpus: float = 1.0
    """CPUs per engine actor (backend = ray)."""
    trainer_resources: dict[str, float] = {}
    """Custom Ray resources per trainer rank (backend = ray), e.g. {"trainer_node" = 1} for nodes started with `ray start --resources='{"trainer_node": 8}'`: pins ranks to such nodes."""
    engine_resources: dict[str, float] = {}
    """Custom Ray resources per engine actor (backend = ray), e.g. {"inference_pool" = 1}: keeps rollouts on a separate pool of nodes."""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy for the trainer ranks and for the engines (Ray's names): PACK fills a node before the next (fewest cross-node links), SPREAD spreads over nodes where it can, STRICT_* insist (STRICT_SPREAD: one bundle per node)."""
    start_timeout_s: float = 600.0
    """How long the trainer ranks or the engines may wait for the cluster to have room for all of them; past it the stage fails, saying what was asked."""


class HerlConfig(_Section):
    run_id: str | None = None
    """Run name; the run lives in runs_dir/run_id. None makes a timestamped id."""
    runs_dir: str = "runs"
    """Folder that holds runs."""
    iterations: int = 1
    """Iterations of rollout -> grade -> hindsight -> advantages -> train."""
    seed: int = 0
    """Seeds prompt sampling, generation, group replacement and training."""
    algorithm: Literal["herl", "he", "naive_he", "grpo"] = "herl"
    """herl = hindsight experience + bonus reward; he = hindsight without bonus; naive_he = hindsight prompts that list the rubric without saying which items were met (no bonus); grpo = plain GRPO (no hindsight)."""
    stage_retries: int = 0
    """Prefect retries per stage task; a retried stage reruns from its inputs."""
    plugins: list[str] = []
    """Python modules imported when a run opens, e.g. ones that register checks with herl.grading.checks.register_check."""
    model: ModelConfig = ModelConfig()
    """The initial policy."""
    task: TaskConfig = TaskConfig()
    """The prompt pool and how many prompts each iteration samples."""
    rollout: RolloutConfig = RolloutConfig()
    """Stage 1: sampling G answers per prompt."""
    grade: GradeConfig = GradeConfig()
    """Stage 2: verdicts and rewards."""
    hindsight: HindsightConfig = HindsightConfig()
    """Stage 3: hindsight prompts and revisions of failed groups."""
    advantages: AdvantagesConfig = AdvantagesConfig()
    """Stage 4: bonus reward, mixing and group advantages."""
    train: TrainConfig = TrainConfig()
    """Stage 5: the policy update."""
    vllm: VLLMConfig = VLLMConfig()
    """The vLLM engine (rollout.engine = vllm or auto), run in its own environment and process."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """Held-out evaluation during training: the policy answers prompts it never trains on, then revises them from the grader's verdicts."""
    tracking: TrackingConfig = TrackingConfig()
    """Experiment tracking: TensorBoard, W&B, MLflow."""
    cluster: ClusterConfig = ClusterConfig()
    """Where trainer ranks and engines run: this machine (local) or a Ray cluster (ray)."""

    @model_validator(mode="after")
    def _check(self) -> HerlConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        r, h, a, t = self.rollout, self.hindsight, self.advantages, self.train
        need(self.run_id is None or (RUN_ID.fullmatch(self.run_id) is not None and self.run_id not in (".", "..")),
             f"run_id {self.run_id!r} must be a plain folder name (letters, digits, '.', '_', '-'; at most 128, "
             "not starting with '.' or '-'): a run lives inside runs_dir and cannot name a path")
        need(self.iterations >= 1, "iterations must be >= 1")
        need(self.stage_retries >= 0, "stage_retries must be >= 0")
        need(self.tracking.plot_every >= 0, "tracking.plot_every must be >= 0 (0: plot.png is drawn when the run ends)")
        need(self.task.prompts_per_iteration >= 1, "task.prompts_per_iteration must be >= 1")
        need(not self.task.source.startswith("builtin:") or self.task.source in ("builtin:toy", "builtin:ifgen"),
             f"task.source {self.task.source!r}: the built-in pools are builtin:toy and builtin:ifgen")
        need(1 <= self.task.num_prompts <= MAX_PROMPTS,
             f"task.num_prompts must be in [1, {MAX_PROMPTS}] (the built-in pool is generated in memory)")
        need(self.task.prompts_per_iteration <= MAX_PROMPTS,
             f"task.prompts_per_iteration must be <= {MAX_PROMPTS}")
        e = self.evaluation
        need(self.task.holdout >= 0, "task.holdout must be >= 0 (0 trains on the whole pool)")
        need(not self.task.source.startswith("builtin:") or self.task.holdout < self.task.num_prompts,
             f"task.holdout ({self.task.holdout}) must be smaller than task.num_prompts ({self.task.num_prompts}): "
             "some prompts must remain for training")
        need(e.every >= 0 and e.rounds >= 0 and e.temperature >= 0,
             "evaluation.every, evaluation.rounds and evaluation.temperature must be >= 0")
        need(e.max_tokens is None or e.max_tokens >= 1, "evaluation.max_tokens must be >= 1 or unset")
        need(e.every == 0 or self.task.holdout >= 1 or e.source is not None,
             "evaluation.every needs prompts to evaluate: set task.holdout (e.g. 16) or evaluation.source "
             "(a prompts file), or evaluation.every = 0")
        need(e.limit is None or e.limit >= 1, "evaluation.limit must be >= 1 or unset")
        need(r.n >= 2, "rollout.n must be >= 2: group advantages need at least two answers per prompt")
        need(r.temperature >= 0, "rollout.temperature must be >= 0 (0 = greedy)")
        need(0 < r.top_p <= 1 and 0 < h.top_p <= 1, "top_p must be in (0, 1]")
        need(r.top_k >= 0, "rollout.top_k must be >= 0 (0 disables it)")
        need(r.max_tokens >= 1 and r.batch_size >= 1, "rollout.max_tokens and rollout.batch_size must be >= 1")
        need(0 < h.threshold <= 1, "hindsight.threshold must be in (0, 1]: rewards lie in [0, 1]")
        need(h.candidate_limit >= 1, "hindsight.candidate_limit must be >= 1")
        need(0 <= h.tie_tolerance < 0.01, "hindsight.tie_tolerance must be in [0, 0.01): rewards closer than it are "
             "equal (1e-6 in the reference; 0 compares exactly)")
        need(h.max_train_prompt_tokens is None or h.max_train_prompt_tokens >= 1,
             "hindsight.max_train_prompt_tokens must be >= 1, or unset to train whole hindsight prompts")
        need(self.task.max_prompt_tokens is None or self.task.max_prompt_tokens >= 1,
             "task.max_prompt_tokens must be >= 1, or unset to keep every prompt")
        need(self.task.epochs is None or self.task.epochs > 0,
             "task.epochs must be > 0, or unset to let `iterations` say how long the run is")
        need(h.revisions_per_candidate >= 1, "hindsight.revisions_per_candidate must be >= 1")
        need(h.temperature >= 0, "hindsight.temperature must be >= 0")
        need(h.max_tokens is None or h.max_tokens >= 1, "hindsight.max_tokens must be >= 1 or unset")
        need(h.template in ("herl", "reference", "goals") or Path(h.template).is_file(),
             f"hindsight.template must be herl, reference, goals or the path of a Jinja template file; "
             f"{h.template!r} is none of them")
        need(h.show_draft or h.template != "reference",
             "hindsight.show_draft = false does not fit hindsight.template = reference (the authors' text revises "
             "a draft it shows); use template = herl or goals")
        need(0 <= a.alpha <= 1, "advantages.alpha must be in [0, 1] (0.05 in the reference)")
        need(1 <= a.replace_top_n <= r.n,
             f"advantages.replace_top_n must be in [1, rollout.n={r.n}]: a revision replaces a group member")
        need(a.eps > 0, "advantages.eps must be > 0")
        need(t.learning_rate > 0, "train.learning_rate must be > 0")
        need(t.mini_batches >= 1 and t.ppo_epochs >= 1 and t.micro_batch_size >= 1,
             "train.mini_batches, train.ppo_epochs and train.micro_batch_size must be >= 1")
        need(t.micro_batch_tokens is None or t.micro_batch_tokens >= 1,
             "train.micro_batch_tokens must be >= 1, or unset to bound micro-batches by micro_batch_size only")
        need(t.mini_batches <= self.task.prompts_per_iteration,
             "train.mini_batches must be <= task.prompts_per_iteration: a mini-batch holds whole groups")
        need(0 < t.clip_eps_low < 1 and t.clip_eps_high > 0, "train.clip_eps_low must be in (0, 1) and clip_eps_high > 0")
        need(t.dual_clip_c > 1, "train.dual_clip_c must be > 1 (3 in the reference)")
        need(t.kl_coef >= 0, "train.kl_coef must be >= 0")
        need(t.keep_snapshots is None or t.keep_snapshots >= 1,
             "train.keep_snapshots must be >= 1 (the newest snapshot is where the next iteration starts), or unset")
        need(t.keep_every >= 0, "train.keep_every must be >= 0 (0: no extra snapshots kept)")
        need(t.lora.rank >= 0 and t.lora.alpha > 0 and 0 <= t.lora.dropout < 1,
             "train.lora.rank must be >= 0 (0 = full fine-tune), alpha > 0 and dropout in [0, 1)")
        need(not (t.lora.rank and t.pure_bf16), "train.pure_bf16 does not apply with LoRA (the base is frozen in "
             "model.dtype and the adapter trains in float32): set one of them")
        lc = t.launcher
        need(lc.num_processes >= 1 and lc.num_machines >= 1 and 0 <= lc.machine_rank < lc.num_machines,
             "train.launcher.num_processes and num_machines must be >= 1 and machine_rank in [0, num_machines)")
        need(lc.num_machines == 1 or lc.main_process_ip is not None,
             "train.launcher.num_machines > 1 needs train.launcher.main_process_ip (the rank-0 machine's address)")
        need(lc.accelerate_config is None or Path(lc.accelerate_config).is_file(),
             f"train.launcher.accelerate_config {lc.accelerate_config!r} is not a file (make one with `accelerate config`)")
        need(lc.timeout_s is None or lc.timeout_s > 0, "train.launcher.timeout_s must be > 0 or unset")
        need(t.is_cap >= 1, "train.is_cap must be >= 1: it truncates importance weights from above")
        v = self.vllm
        need(v.tensor_parallel_size >= 1 and v.data_parallel_size >= 1,
             "vllm.tensor_parallel_size and vllm.data_parallel_size must be >= 1")
        need(0 < v.gpu_memory_utilization <= 1, "vllm.gpu_memory_utilization must be in (0, 1]")
        need(v.cpu_kvcache_gib > 0 and v.timeout_s > 0, "vllm.cpu_kvcache_gib and vllm.timeout_s must be > 0")
        c = self.cluster
        need(c.trainer_gpus >= 0 and c.trainer_cpus > 0 and c.engine_cpus > 0 and (c.engine_gpus or 0) >= 0,
             "cluster.trainer_cpus and engine_cpus must be > 0, trainer_gpus and engine_gpus >= 0")
        need(c.engines is None or c.engines >= 1, "cluster.engines must be >= 1, or unset to take vllm.data_parallel_size")
        need(c.start_timeout_s > 0, "cluster.start_timeout_s must be > 0")
        need(c.backend != "ray" or lc.num_machines == 1,
             "cluster.backend = ray places the trainer ranks itself: leave train.launcher.num_machines at 1 and set "
             "train.launcher.num_processes to the number of ranks (with cluster.trainer_gpus each)")
        need(c.backend != "ray" or t.between_iterations != "exit",
             "cluster.backend = ray places the resident trainer: train.between_iterations = exit (a job per "
             "iteration) is local only; use auto, keep or offload")
        need(c.backend != "ray" or lc.accelerate_config is None,
             "cluster.backend = ray starts each rank itself (torch.distributed over the placed actors), without "
             "`accelerate launch`: leave train.launcher.accelerate_config unset")
        j = self.grade.judge
        need(j.concurrency >= 1 and j.retries >= 0 and j.parse_retries >= 0,
             "grade.judge.concurrency must be >= 1, retries and parse_retries >= 0")
        need(j.timeout_s > 0 and j.backoff_s >= 0, "grade.judge.timeout_s must be > 0 and backoff_s >= 0")
        # the config is written to config.json, Prefect, trackers and model cards: no secrets in it
        _no_secret("grade.judge.base_url", j.base_url, "Put the key in the variable grade.judge.api_key_env names "
                   "(or a Prefect Secret, api_key_secret)")
        _no_secret("tracking.mlflow_uri", self.tracking.mlflow_uri, "Give MLflow its credentials in "
                   "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        need(ENV_NAME.fullmatch(j.api_key_env) is not None,
             "grade.judge.api_key_env must name an environment variable (letters, digits, '_'), e.g. OPENAI_API_KEY; "
             "it looks like a key itself: never put the key in the config, export it in that variable")
        return self

    @property
    def hindsight_enabled(self) -> bool:
        return self.algorithm != "grpo"

    @property
    def bonus_enabled(self) -> bool:
        return self.algorithm == "herl"

    def evaluation_due(self, k: int) -> bool:
        """Whether policy k (the snapshot iteration k uses; k = iterations is the final one) is evaluated."""
        every = self.evaluation.every
        return every > 0 and 0 <= k <= self.iterations and (k % every == 0 or k == self.iterations)

    def iteration_stages(self, k: int) -> list[str]:
        """The plan of iteration k, for k in 0..iterations: the held-out evaluation of policy k
        where it is due, then the five training stages (none for k = iterations, which only
        evaluates the final policy)."""
        return ([HELDOUT.name] if self.evaluation_due(k) else []) + (list(STAGES) if k < self.iterations else [])


# The config parts each stage's output depends on (schemas/stages.py): a change to one of
# these redoes the stage on resume; a change elsewhere (say iterations) does not.
STAGE_CONFIG: dict[str, tuple[str, ...]] = {name: spec.config for name, spec in SPECS.items()}


def plugin_sources(modules: list[str]) -> list[list[str | None]]:
    """[module, sha256 of its source file] per plugin: a changed check redoes the stages that grade."""
    import importlib.util

    out = []
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        origin = spec.origin if spec is not None else None
        digest = hashlib.sha256(Path(origin).read_bytes()).hexdigest()[:16] if origin and Path(origin).is_file() else None
        out.append([name, digest])
    return out


# settings that change how a stage runs, not what it writes: left out of its hash
# fields that change how a stage runs, never what it writes
HASH_EXCLUDED = {"train": ("launcher", "between_iterations"), "vllm": ("between_iterations",)}
# fields added after runs existed, at the value that does what runs did before them: left
# out of the hash at that value, so adding them does not redo a run's finished stages
HASH_NEUTRAL: dict[str, dict[str, Any]] = {
    "hindsight": {"show_draft": True, "show_items": "all", "show_details": False, "max_train_prompt_tokens": None},
    "task": {"epochs": None, "max_prompt_tokens": None},
}


def stage_config_hash(cfg: HerlConfig, stage: str) -> str:
    """The hash of the config sections `stage` depends on (its manifest records it; a
    different hash redoes the stage on resume)."""
    dumped = cfg.model_dump(mode="json")
    part = {k: dumped[k] for k in STAGE_CONFIG[stage]}
    for section, keys in HASH_EXCLUDED.items():
        for key in keys if section in part else ():
            part[section].pop(key, None)
    if "grade" in part:  # the pre-flight judge probe changes no verdict
        part["grade"].get("judge", {}).pop("probe", None)
    for section, neutral in HASH_NEUTRAL.items():
        for key, value in neutral.items() if section in part else ():
            if part[section].get(key) == value:
                part[section].pop(key)
    if "plugins" in part:
        part["plugins"] = plugin_sources(cfg.plugins)
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(UserError, ValueError):
    """The configuration cannot be loaded; the message names the file and field."""


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word is a string: --set algorithm=grpo


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs as dotted overrides; VALUE is JSON where it parses, else a string."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.learning_rate=1e-5), got {pair!r}")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> HerlConfig:
    """Load a TOML/JSON config (default: the embedded tiny preset; a bare name is a shipped
    preset of schemas/presets/) and apply dotted overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists() and path.suffix == "" and (PRESETS / f"{path}.toml").is_file():
        path = PRESETS / f"{path}.toml"  # a shipped preset by name: smollm2, medical, instruction_following, tiny
    try:
        text = read_utf8(path, ConfigError)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from exc
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    base = copy.deepcopy(data)
    for key, value in given.items():
        _set_dotted(data, key, value)
    if "iterations" in given and "task.epochs" not in given and isinstance(data.get("task"), dict):
        data["task"].pop("epochs", None)  # iterations given by name win over the file's task.epochs
    try:
        return HerlConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
    # blame what the user gave: an override whose key the error is about, else the file
    # itself when it fails alone, else the overrides together (a cross-field check)
    file_ok = True
    if given:
        try:
            HerlConfig.model_validate(base)
        except ValidationError:
            file_ok = False
    lines = []
    for err in errors:
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        blamed = next((k for k in given if loc == k or loc.startswith(k + ".") or (loc and k.startswith(loc + "."))
                       or (not loc and re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", msg))), None)
        if blamed is not None:
            lines.append(f"  --set {blamed}={_shown(blamed, given[blamed])}: {msg if not loc else f'field {loc}: {msg}'}")
        elif given and file_ok:
            sets = " ".join(f"--set {k}={_shown(k, v)}" for k, v in given.items())
            lines.append(f"  field {loc or '(top level)'}: {msg} (the file alone is valid; with {sets} it is not)")
        else:
            lines.append(f"  field {loc or '(top level)'}: {msg}")
    raise ConfigError(f"config file {path} is invalid:\n" + "\n".join(lines))


def _shown(key: str, value: Any) -> str:
    """An override as an error message shows it: never a credential (a URL's user and
    password, or a key given where a variable name belongs)."""
    if key.endswith("api_key_env") and isinstance(value, str) and ENV_NAME.fullmatch(value) is None:
        return '"<hidden>"'
    if isinstance(value, str) and _url_has_credentials(value):
        return '"<a URL with a secret, hidden>"'
    return json.dumps(value)


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from the model's field docstrings."""
    lines = ["| field | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = json.dumps(field.default)
            lines.append(f"| `{prefix}{name}` | `{default}` | {field.description} |")

    walk(HerlConfig, "")
    return "\n".join(lines)


def update_reference(page: Path) -> None:
    """Replace the table between the config-reference markers of docs/configuration.md."""
    text = page.read_text()
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{start}\n{reference_markdown()}\n{end}{tail}")


if __name__ == "__main__":
    import sys

    if "--update" in sys.argv:
        update_reference(Path(__file__).resolve().parent.parent / "docs" / "configuration.md")
    else:
        print(reference_markdown())
