"""Generation engines behind one small interface.

    engine = load_engine(kind, snapshot_path, dtype, batch_size, vllm_cfg)
    outs = engine.generate([GenRequest(id, prompt_token_ids, seed, n)], SamplingParams(...))
    # outs[i] is a list of n Completion(token_ids, text, finish_reason, logprobs)
    engine.close()

Stages use `shared_engine(...)` instead: one engine per run (per process and settings).
It stays open across stages and iterations; when a stage asks for another snapshot of the
same model, the new weights are loaded into the running engine (vLLM: in place, in
seconds, instead of a start-up of 30-160 s). While the train job runs, `rest_engines`
keeps it, puts it to sleep (vLLM's sleep mode frees GPU memory) or closes it
(`vllm.between_iterations`); `release_engines()` closes it at the end.

Prompts are rendered once, by `render_chat`, with the tokenizer's chat template, so
every engine sees identical token ids. Completions include the EOS token when the
model stopped (finish_reason "stop"), so training teaches the model where to stop;
`logprobs` are the engine's log-probabilities of the sampled tokens under the
distribution sampled from, logits / T (T the sampling temperature; greedy counts as
T = 1; vLLM's processed_logprobs), for comparison with the trainer's recomputed ones.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from herl.models.tokenizer import load_tokenizer, quiet_transformers
from herl.util.progress import Progress
from schemas.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256


@dataclass(frozen=True)
class GenRequest:
    request_id: str
    prompt_token_ids: list[int]
    seed: int
    n: int = 1


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS) or "length"
    logprobs: list[float] | None = field(default=None)


class Engine(Protocol):
    tokenizer: object
    path: Path  # the weights it generates from
    sync_seconds: float  # seconds the last load_weights took (0 when shared_engine needed none)

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[Completion]]: ...

    def load_weights(self, path: Path) -> None: ...

    def sleep(self, mode: str) -> None: ...

    def close(self) -> None: ...


def sampling_temperature(temperature: float) -> float:
    """The temperature log-probs are taken at: the sampling one, and 1 for greedy (T = 0)."""
    return temperature if temperature > 0 else 1.0


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from (run seed, iteration, prompt id, ...)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """Render chat messages with the model's chat template, ready for the assistant turn."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, list(ids)


class PromptTooLongError(UserError, ValueError):
    """A prompt plus its answer budget does not fit the model's context window."""


def context_length(path: Path, max_model_len: int | None = None) -> int | None:
    """The longest prompt + answer the model takes: its config's position limit, lowered
    to `max_model_len` when one is set; None when the config names no limit."""
    import json

    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    cfg = cfg.get("text_config", cfg)
    limits = [cfg.get(k) for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")]
    limits = [v for v in limits if isinstance(v, int) and v > 0][:1]
    if max_model_len:
        limits.append(max_model_len)
    return min(limits) if limits else None


def check_prompt_lengths(requests: list[GenRequest], max_tokens: int, limit: int | None, model: Path,
                         where: str = "") -> None:
    """Refuse, before any generation, requests whose prompt + max_tokens exceed `limit`
    (a 15k-token prompt on a 4k model would otherwise exhaust memory, not fail)."""
    if limit is None:
        return
    over = [r for r in requests if len(r.prompt_token_ids) + max_tokens > limit]
    if over:
        worst = max(over, key=lambda r: len(r.prompt_token_ids))
        raise PromptTooLongError(
            f"{where}{len(over)} prompt(s) do not fit the context of {model} ({limit} tokens) with max_tokens = {max_tokens}: "
            f"{', '.join(r.request_id for r in over[:5])}{' ...' if len(over) > 5 else ''} "
            f"(longest: {worst.request_id}, {len(worst.prompt_token_ids)} prompt tokens). "
            "Shorten or remove those prompts, or lower the max_tokens setting")


class _StepLogprobs:
    """The log-prob of each sampled token under logits / T, kept step by step while
    `generate` runs, instead of every step's logits over the whole vocabulary
    (`output_logits`: B x S x V floats, 1.6 GB for SmolLM2 at 64 x 128 tokens, 13 GB for a
    262k vocabulary). A forward hook keeps the newest step's log-softmax (B, V); the next
    forward's input ids are the tokens sampled from it, so its pre-hook takes their
    log-probs (B,). The logits are the ones generate samples from (the last position's,
    in float32), divided by T as the trainer and vLLM's processed_logprobs do."""

    def __init__(self, model, temperature: float):
        self.temperature, self.prev = temperature, None
        self.taken: list = []  # (B,) log-probs, one per step taken
        self.handles = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                        model.register_forward_hook(self._after)]

    def _before(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.prev is not None and ids is not None:  # ids[:, -1]: the tokens sampled from self.prev
            self.taken.append(self.prev.gather(-1, ids[:, -1:]).squeeze(-1))  # (B,)
            self.prev = None

    def _after(self, _module, _args, output):
        import torch

        logits = output.logits[:, -1, :].float()  # (B, V), as generate takes them
        self.prev = torch.log_softmax(logits / self.temperature, dim=-1)

    def result(self, new):
        """(B, S) log-probs of the generated tokens `new` (B, S)."""
        import torch

        if self.prev is not None:  # the last step: nothing was generated after it
            self.taken.append(self.prev.gather(-1, new[:, len(self.taken):len(self.taken) + 1]).squeeze(-1))
            self.prev = None
        return torch.stack(self.taken[: new.size(1)], dim=1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class TransformersEngine:
    """Batched, seeded sampling with transformers `generate` (left padding).

    Requests are packed into batches of at most `batch_size` sequences in request order;
    each batch is seeded from its requests' seeds, so the same requests with the same
    config reproduce the same samples.
    """

    def __init__(self, path: Path, dtype: str = "float32", batch_size: int = 64, announce: bool = False):
        import sys
        import time

        t0 = time.perf_counter()
        quiet_transformers()
        self.tokenizer = load_tokenizer(path)
        self.dtype = dtype
        self.path, self.context_length = Path(path), context_length(path)
        self.model = self._load()
        self.batch_size = batch_size
        self.eos_ids = set(_eos_ids(self.model, self.tokenizer))
        self.sync_seconds = 0.0
        if announce:  # the run's engine (shared_engine): one line, whatever the terminal
            print(f"herl: transformers engine ready for {self.path.name} in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)

    def _load(self):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.path, dtype=getattr(torch, self.dtype)).eval()

    def load_weights(self, path: Path) -> None:
        """Generate from another snapshot of the same model from now on."""
        import time

        t0 = time.perf_counter()
        self.path = Path(path)
        self.model = self._load()
        self.sync_seconds = time.perf_counter() - t0

    def sleep(self, mode: str) -> None:
        """Before a train job: `sleep` (and `auto` on a GPU) frees the model's memory; it
        is loaded again at the next generate."""
        import torch

        if mode == "sleep" or (mode == "auto" and torch.cuda.is_available()):
            self.model = None

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[Completion]]:
        check_prompt_lengths(requests, params.max_tokens, self.context_length, self.path)
        if self.model is None:
            self.model = self._load()
        results: list[list[Completion]] = [[] for _ in requests]
        # expand to one entry per sequence, then pack into batches
        seqs = [(i, r) for i, r in enumerate(requests) for _ in range(r.n)]
        with Progress("generate", len(seqs), "sequences") as progress:
            for start in range(0, len(seqs), self.batch_size):
                chunk = seqs[start:start + self.batch_size]
                comps = self._generate_batch([r for _, r in chunk], params)
                for (i, _), comp in zip(chunk, comps):
                    results[i].append(comp)
                progress.update(len(chunk), tokens=sum(len(c.token_ids) for c in comps))
        return results

    def _generate_batch(self, reqs: list[GenRequest], params: SamplingParams) -> list[Completion]:
        import torch

        pad = self.tokenizer.pad_token_id
        width = max(len(r.prompt_token_ids) for r in reqs)
        input_ids = torch.full((len(reqs), width), pad, dtype=torch.long)  # (B, T) left-padded
        attn = torch.zeros((len(reqs), width), dtype=torch.long)
        for b, r in enumerate(reqs):
            input_ids[b, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            attn[b, width - len(r.prompt_token_ids):] = 1
        greedy = params.temperature == 0
        gen_kwargs = dict(
            max_new_tokens=params.max_tokens, do_sample=not greedy, pad_token_id=pad,
            eos_token_id=sorted(self.eos_ids), return_dict_in_generate=True,
        )
        if not greedy:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        generator_seed = derive_seed(*(r.seed for r in reqs), len(reqs))
        torch.manual_seed(generator_seed)
        steps = _StepLogprobs(self.model, sampling_temperature(params.temperature))
        try:
            with torch.no_grad():
                out = self.model.generate(input_ids=input_ids, attention_mask=attn, **gen_kwargs)
        finally:
            steps.remove()
        new = out.sequences[:, width:]  # (B, S)
        logp = steps.result(new)  # (B, S)
        comps = []
        for b in range(len(reqs)):
            ids = new[b].tolist()
            finish = "length"
            for t, tok in enumerate(ids):
                if tok in self.eos_ids:
                    ids, finish = ids[: t + 1], "stop"
                    break
            comps.append(Completion(
                token_ids=ids,
                text=self.tokenizer.decode(ids, skip_special_tokens=True),
                finish_reason=finish,
                logprobs=logp[b, : len(ids)].tolist(),
            ))
        return comps

    def close(self) -> None:
        self.model = None


VLLM_READY = "herl-vllm-ready.json"  # written by `herl install-vllm` once vLLM imports in the environment


def default_vllm_venv() -> Path:
    """Where `herl install-vllm` makes the vLLM environment: herl's home (herl.util.home)."""
    from herl.util.home import herl_home

    return herl_home() / "vllm-venv"


def vllm_venv_problem(venv: Path) -> str | None:
    """Why the environment at `venv` is not a whole one `herl install-vllm` made (None: it is)."""
    if not (venv / "bin" / "python").exists():
        return f"{venv} has no bin/python"
    if not (venv / VLLM_READY).exists():
        return (f"{venv} is not a finished vLLM environment (no {VLLM_READY}: an interrupted `herl install-vllm`?); "
                "run `herl install-vllm` again")
    return None


def find_vllm_python(configured: str | None = None) -> str | None:
    """The interpreter of a vLLM environment: the configured one, $HERL_VLLM_PYTHON, this
    interpreter if it can import vllm, or the venv `herl install-vllm` made under herl's
    home, when it finished (its ready file); else None."""
    import importlib.util
    import os
    import sys

    for candidate in (configured, os.environ.get("HERL_VLLM_PYTHON")):
        if candidate:
            if not Path(candidate).exists():
                raise FileNotFoundError(f"vLLM interpreter {candidate} does not exist; run `herl install-vllm` "
                                        "or fix vllm.python / HERL_VLLM_PYTHON")
            return candidate
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    venv = default_vllm_venv()
    return None if vllm_venv_problem(venv) else str(venv / "bin" / "python")


# On a CPU, vLLM pays off from this many parameters (benchmarks/results/peer_trl: SmolLM2-135M,
# 64 answers x 64 tokens, 2 cores: 27.5 s a rollout against transformers' 36.3 s, its ~18 s
# start repaid by the third iteration; docs/scaling.md: a 27M model generated slower with vLLM)
CPU_VLLM_MIN_PARAMS = 100_000_000


def parameter_count(folder: Path) -> int | None:
    """The parameters of a model folder's safetensors files, from their headers (no weights
    read); None when it has none."""
    import json
    import math

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def resolve_engine_kind(kind: str, vllm_cfg=None, path: Path | None = None) -> str:
    """`auto` becomes vllm where a whole vLLM environment is found and vLLM pays off: on a
    GPU, or on a CPU for a model of at least CPU_VLLM_MIN_PARAMS parameters (`path`; a
    smaller one generates faster with transformers); else transformers."""
    if kind != "auto":
        return kind
    if not find_vllm_python(getattr(vllm_cfg, "python", None)):
        return "transformers"
    import torch

    if torch.cuda.is_available() or path is None:
        return "vllm"
    try:
        params = parameter_count(Path(path))
    except (OSError, ValueError, KeyError):
        params = None
    return "vllm" if params is not None and params >= CPU_VLLM_MIN_PARAMS else "transformers"


class VLLMEngine:
    """vLLM's offline engine in its own process and environment (herl/generation/vllm_worker.py).

    Per-request seeds, so a request's samples do not depend on what it is batched with.
    The engine process starts with the first generate call and serves every later one
    until `close`, which ends it and frees its memory. `load_weights` loads another
    snapshot of the same model into the running engine (vLLM's reload_weights, then its
    prefix cache is reset, so nothing computed with the old weights is reused); `sleep`
    frees its GPU memory while a train job runs. An engine process that died (a crash, a
    kill) is replaced by a fresh one on the current weights at the next call.
    """

    def __init__(self, path: Path, dtype: str = "float32", vllm_cfg=None):
        from schemas.config import VLLMConfig

        self.cfg = vllm_cfg or VLLMConfig()
        python = find_vllm_python(self.cfg.python)
        if python is None:
            venv = default_vllm_venv()
            why = f" ({vllm_venv_problem(venv)})" if venv.exists() else ""
            raise RuntimeError(f"rollout.engine = vllm but no vLLM environment was found{why}: run `herl install-vllm` "
                               "(or set vllm.python / HERL_VLLM_PYTHON)")
        self.python: str = python
        self.path, self.dtype = Path(path), dtype
        self.tokenizer = load_tokenizer(path)
        self.last_stats: dict = {}
        self.starts = 0  # engine processes started so far
        self.syncs = 0  # weight loads into a running engine so far
        self.died = False  # the last failure was the engine process's death
        self.sync_seconds = 0.0
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._jobs = 0

    def _engine_kwargs(self) -> dict:
        c = self.cfg
        engine = {"model": str(self.path), "dtype": self.dtype, "seed": 0,
                  "tensor_parallel_size": c.tensor_parallel_size, "data_parallel_size": c.data_parallel_size,
                  "gpu_memory_utilization": c.gpu_memory_utilization, "enforce_eager": c.enforce_eager,
                  # log-probs after temperature scaling, as the trainer computes them (top-k / top-p
                  # masking would also show here: leave them off where the log-probs matter)
                  "logprobs_mode": "processed_logprobs",
                  # herl's own key (the worker takes it out): whether to enable vLLM's sleep mode
                  "herl_sleep": c.between_iterations}
        if c.max_model_len:
            engine["max_model_len"] = c.max_model_len
        if c.enable_chunked_prefill is not None:
            engine["enable_chunked_prefill"] = c.enable_chunked_prefill
        return engine

    def _start(self) -> None:
        import json
        import os
        import subprocess
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="herl-vllm-")
        tmp = Path(self._tmp.name)
        (tmp / "engine.json").write_text(json.dumps(self._engine_kwargs()))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.cfg.cpu_kvcache_gib),
               "VLLM_CONFIGURE_LOGGING": os.environ.get("VLLM_CONFIGURE_LOGGING", "1"),
               # the engine's workers import herl_vllm_reload.WeightReload (herl/generation/vllm_ext)
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent / "vllm_ext"),
                                                           os.environ.get("PYTHONPATH")]))}
        read_fd, write_fd = os.pipe()
        self._log = open(tmp / "engine.log", "w")
        try:
            # own session: on cancellation or timeout the whole engine process group goes
            self._proc = subprocess.Popen(
                [self.python, str(Path(__file__).with_name("vllm_worker.py")), str(tmp / "engine.json"), str(write_fd)],
                stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, env=env, text=True,
                start_new_session=True, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        self._control = os.fdopen(read_fd)
        self.starts += 1

    def _failure(self, what: str) -> RuntimeError:
        assert self._tmp is not None
        tail = (Path(self._tmp.name) / "engine.log").read_text()[-4000:]
        self.died = self._proc is not None and self._proc.poll() is not None  # not merely slow
        self.close()
        return RuntimeError(f"vLLM engine process failed ({what}) for {self.path}:\n{tail}")

    def _running(self) -> bool:
        """Whether an engine process is up; one that died is cleaned up (a fresh one starts
        at the next generate, on the current weights)."""
        if self._proc is not None and self._proc.poll() is not None:
            import sys

            print(f"herl: the vLLM engine process had ended (exit {self._proc.returncode}); starting a fresh one",
                  file=sys.stderr, flush=True)
            self.close()
        return self._proc is not None

    def _call(self, job: dict) -> dict:
        """Send one job line to the running engine process and wait for its reply."""
        import json
        import select

        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(job) + "\n")
            self._proc.stdin.flush()
            ready, _, _ = select.select([self._control], [], [], self.cfg.timeout_s)
            reply = self._control.readline() if ready else ""
        except BrokenPipeError:
            ready, reply = [self._control], ""
        except BaseException:  # interrupted: the engine goes with the caller
            self.close()
            raise
        if not reply:
            raise self._failure(f"exit {self._proc.poll()}" if ready else f"no answer within {self.cfg.timeout_s} s")
        answer = json.loads(reply)
        if "error" in answer:
            if "EngineDeadError" in answer["error"]:  # the worker exits after this reply
                try:
                    self._proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
                raise self._failure("its engine core died")
            raise RuntimeError(f"vLLM engine failed for {self.path}:\n{answer['error']}")
        return answer

    def load_weights(self, path: Path) -> None:
        """Generate from another snapshot of the same model from now on: loaded into the
        running engine in place, or by the next start when none is running."""
        path = Path(path)
        if not self._running():
            self.path, self.sync_seconds = path, 0.0
            return
        self.died = False
        try:
            answer = self._call({"reload": str(path)})
        except (RuntimeError, OSError):
            self.close()  # whatever it holds now is not known: the next generate starts afresh
            self.path, self.sync_seconds = path, 0.0
            if not self.died:
                raise  # the engine is up but refused the weights, or hung: the failure stands
            # the engine died during the reload (a kill, out of memory): the next generate
            # starts a fresh one on the new weights, as after a death during a job
            import sys

            print("herl: the vLLM engine died while loading new weights; the next generation starts a fresh engine "
                  "on them", file=sys.stderr, flush=True)
            return
        except BaseException:
            self.close()
            self.path = path
            raise
        self.path, self.syncs, self.sync_seconds = path, self.syncs + 1, answer.get("seconds", 0.0)

    def sleep(self, mode: str) -> None:
        """Before a train job: the worker puts the engine to sleep (weights and KV cache
        freed; GPUs only, with `sleep`, or `auto` there), or keeps it as it is."""
        if self._running():
            self._call({"sleep": mode})

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[Completion]]:
        if not requests:
            return []
        check_prompt_lengths(requests, params.max_tokens, context_length(self.path, self.cfg.max_model_len), self.path)
        self.died = False
        try:
            return self._generate(requests, params)
        except (RuntimeError, OSError):
            if not self.died:
                raise  # the engine is up, or hung past vllm.timeout_s: the failure stands
            # the engine died under the job (a kill, out of memory): once more on a fresh one
            # (per-request seeds: the same requests sample the same tokens)
            import sys

            print("herl: the vLLM engine died during a job; running it again on a fresh engine", file=sys.stderr,
                  flush=True)
            return self._generate(requests, params)

    def _generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[Completion]]:
        import json
        import sys

        starting = not self._running()
        if starting:
            # said whatever the terminal: a start-up takes minutes on CPUs and shows nothing else
            print(f"herl: starting the vLLM engine for {self.path.name} (its own process; "
                  f"up to vllm.timeout_s = {self.cfg.timeout_s:g} s)", file=sys.stderr, flush=True)
            self._start()
        assert self._proc is not None and self._proc.stdin is not None and self._tmp is not None
        self._jobs += 1
        tmp = Path(self._tmp.name)
        req_path, out_path = tmp / f"requests-{self._jobs}.jsonl", tmp / f"results-{self._jobs}.jsonl"
        sampling = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                    "max_tokens": params.max_tokens}
        with open(req_path, "w") as fh:
            fh.write(json.dumps({"sampling": sampling}) + "\n")
            for r in requests:
                fh.write(json.dumps({"request_id": r.request_id, "prompt_token_ids": r.prompt_token_ids,
                                     "seed": r.seed, "n": r.n}) + "\n")
        self._call({"requests": str(req_path), "results": str(out_path)})
        lines = [json.loads(line) for line in out_path.read_text().split("\n") if line.strip()]
        req_path.unlink()
        out_path.unlink()
        self.last_stats = lines[-1]["stats"]
        if starting:
            print(f"herl: vLLM engine ready: start-up {self.last_stats.get('startup_seconds', 0.0):.1f} s, "
                  f"first job {self.last_stats.get('generation_seconds', 0.0):.1f} s", file=sys.stderr, flush=True)
        by_id = {row["request_id"]: row["completions"] for row in lines[:-1]}
        out = [[Completion(token_ids=x["token_ids"], text=x["text"], finish_reason=x["finish_reason"],
                           logprobs=x["logprobs"]) for x in by_id[r.request_id]] for r in requests]
        # the engine process answers once per job: its progress shows when the job is done
        with Progress("generate (vLLM)", sum(r.n for r in requests), "sequences") as progress:
            progress.update(sum(r.n for r in requests), tokens=sum(len(c.token_ids) for cs in out for c in cs))
        return out

    def close(self) -> None:
        """End the engine process (its input closes; killed if it does not exit) and free its memory."""
        import os
        import signal
        import subprocess

        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # and whatever the engine started
                except ProcessLookupError:
                    pass
                proc.wait()
                self._control.close()
                self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def load_engine(kind: str, path: Path, dtype: str = "float32", batch_size: int = 64, vllm_cfg=None,
                announce: bool = False) -> Engine:
    """A new engine for the model at `path`; the caller closes it (see shared_engine).
    `announce`: say on stderr when it is ready (vLLM's engine always says so when it starts)."""
    kind = resolve_engine_kind(kind, vllm_cfg, path)
    if kind == "transformers":
        return TransformersEngine(path, dtype=dtype, batch_size=batch_size, announce=announce)
    if kind == "vllm":
        return VLLMEngine(path, dtype=dtype, vllm_cfg=vllm_cfg)
    raise ValueError(f"unknown engine {kind!r}: use 'auto', 'transformers' or 'vllm'")


# One engine at a time per process, kept for the whole run: held-out evaluation, rollout
# and hindsight of every iteration share it, and a new snapshot's weights are loaded
# into it. Keyed by the engine's settings and the model's identity, not its weights.
_SHARED: dict[tuple, Engine] = {}
_WEIGHTS: dict[tuple, tuple] = {}  # key -> the (folder, inode, mtime) its engine holds


def model_identity(path: Path) -> str:
    """What must be equal for two model folders to share an engine: the architecture
    (config.json without its path and version fields) and the tokenizer as loaded (its
    full serialization, chat template and special tokens; files re-saved by another
    library version differ in bytes, not in behaviour). Two snapshots of one run agree;
    another model, or a base model beside its instruct version, does not."""
    import os

    st = os.stat(path)
    return _identity(str(path), st.st_ino, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _identity(path: str, inode: int, mtime_ns: int) -> str:
    import json

    digest = hashlib.sha256()
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {"unreadable": path}
    for key in ("_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    digest.update(json.dumps(cfg, sort_keys=True).encode())
    tok = load_tokenizer(Path(path))
    backend = getattr(tok, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))).encode())
    digest.update(json.dumps([type(tok).__name__, tok.chat_template, tok.eos_token_id, tok.pad_token_id,
                              tok.bos_token_id], default=str).encode())
    return digest.hexdigest()


def shared_engine(kind: str, path: Path, dtype: str = "float32", batch_size: int = 64, vllm_cfg=None,
                  cluster=None, shared: Path | None = None) -> Engine:
    """The run's engine, generating from the snapshot at `path`: the open one (its weights
    replaced by this snapshot's when it holds another's), or a new one (closing any other:
    another model or other settings). `engine.sync_seconds` says what the weight load
    took (0: none was needed). Stages do not close it; release_engines does, at the end
    of a flow and at exit. cluster.backend = ray: the engines are Ray actors
    (herl/generation/ray_engines.py), each checked to see `shared` (the run folder; by
    default the model's parent folder)."""
    import atexit
    import os

    from herl.models.lora import engine_model

    path = engine_model(Path(path).resolve(), dtype)  # a LoRA snapshot generates from its merged copy
    st = os.stat(path)  # a snapshot folder replaced on disk (a redone train stage) holds other weights
    weights = (str(path), st.st_ino, st.st_mtime_ns)
    on_ray = cluster is not None and cluster.backend == "ray"
    key = (resolve_engine_kind(kind, vllm_cfg, path), model_identity(path), dtype, batch_size,
           vllm_cfg.model_dump_json() if vllm_cfg is not None else None,
           cluster.model_dump_json() if on_ray else None)
    engine = _SHARED.get(key)
    if engine is not None and getattr(engine, "closed", False):  # Ray engines closed after a lost actor
        release_engines()
        engine = None
    if engine is None:
        release_engines()
        atexit.unregister(release_engines)  # registered once
        atexit.register(release_engines)
        if on_ray:
            from herl.generation.ray_engines import RayEngines
            from schemas.config import VLLMConfig

            engine = _SHARED[key] = RayEngines(key[0], path, dtype, batch_size, vllm_cfg or VLLMConfig(), cluster,
                                               Path(shared) if shared is not None else path.parent)
        else:
            engine = _SHARED[key] = load_engine(kind, path, dtype=dtype, batch_size=batch_size, vllm_cfg=vllm_cfg,
                                                announce=True)
        engine.sync_seconds = 0.0
    elif _WEIGHTS.get(key) != weights:
        _WEIGHTS.pop(key, None)  # unknown until the load succeeds
        engine.load_weights(path)
    else:
        engine.sync_seconds = 0.0
    _WEIGHTS[key] = weights
    return engine


def rest_engines(mode: str, free_bytes_needed: int = 0) -> None:
    """Before a train job (`vllm.between_iterations`): `keep` the engine as it is,
    `sleep` (free its accelerator memory; reloaded with the next weights), `restart`
    (close it: the next stage starts a fresh one), or `auto`: sleep on GPUs, keep on CPUs
    unless less than `free_bytes_needed` of memory is available, then close it."""
    if not _SHARED:
        return
    if mode == "restart":
        release_engines()
        return
    if mode == "auto" and free_bytes_needed and available_memory() < free_bytes_needed:
        release_engines()
        return
    for engine in _SHARED.values():
        engine.sleep(mode)


def available_memory() -> int:
    """Bytes of memory available to a new process (MemAvailable); very large where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def release_engines() -> None:
    """Close the shared engine, if any, and free its memory."""
    _WEIGHTS.clear()
    while _SHARED:
        _, engine = _SHARED.popitem()
        engine.close()
