"""Generation engines behind one small interface.

    engine = load_engine(cfg, snapshot_path)
    outs = engine.generate([GenRequest(id, prompt_token_ids, seed, n)], SamplingParams(...))
    # outs[i] is a list of n Completion(token_ids, text, finish_reason, logprobs)
    engine.close()

Prompts are rendered once, by `render_chat`, with the tokenizer's chat template, so
every engine sees identical token ids. Completions include the EOS token when the
model stopped (finish_reason "stop"), so training teaches the model where to stop;
`logprobs` are the engine's log-probabilities of the sampled tokens under the raw
(temperature 1) distribution, for comparison with the trainer's recomputed ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


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

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from (run seed, iteration, prompt id, ...)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[int]]:
    """Render chat messages with the model's chat template, ready for the assistant turn."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, list(ids)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class TransformersEngine:
    """Batched, seeded sampling with transformers `generate` (left padding).

    Requests are packed into batches of at most `batch_size` sequences in request order;
    each batch is seeded from its requests' seeds, so the same requests with the same
    config reproduce the same samples.
    """

    def __init__(self, path: Path, dtype: str = "float32", batch_size: int = 64):
        import torch
        from transformers import AutoModelForCausalLM

        _quiet_transformers()
        self.tokenizer = load_tokenizer(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        self.model.eval()
        self.batch_size = batch_size
        self.eos_ids = set(_eos_ids(self.model, self.tokenizer))

    def generate(self, requests: list[GenRequest], params: SamplingParams) -> list[list[Completion]]:
        results: list[list[Completion]] = [[] for _ in requests]
        # expand to one entry per sequence, then pack into batches
        seqs = [(i, r) for i, r in enumerate(requests) for _ in range(r.n)]
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            for (i, _), comp in zip(chunk, self._generate_batch([r for _, r in chunk], params)):
                results[i].append(comp)
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
            eos_token_id=sorted(self.eos_ids), return_dict_in_generate=True, output_logits=True,
        )
        if not greedy:
            gen_kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        generator_seed = derive_seed(*(r.seed for r in reqs), len(reqs))
        torch.manual_seed(generator_seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=attn, **gen_kwargs)
        new = out.sequences[:, width:]  # (B, S)
        logits = torch.stack(out.logits, dim=1).float()  # (B, S, V) raw, before temperature
        logp = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)  # (B, S)
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


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def load_engine(kind: str, path: Path, dtype: str = "float32", batch_size: int = 64) -> Engine:
    if kind == "transformers":
        return TransformersEngine(path, dtype=dtype, batch_size=batch_size)
    raise ValueError(f"unknown engine {kind!r}: use 'transformers'")
