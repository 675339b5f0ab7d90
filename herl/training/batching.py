"""The train step's batching: the batch as columns, micro-batches, and per-token log-probs.

`Sequences` holds the iteration's batch table (one entry per trained sequence) as
columns; micro-batches and process shares are lists of indices into it, so nothing is
stashed on rows. `Prepared` holds what the update needs per sequence and never changes
during it: the old policy's log-probs, the reference's, and the truncated importance
weights. `sequence_logprobs` computes log-probs at response positions only, in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def sequence_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      temperatures: list[float] | None = None):
    """Per-token log-probs of each response given its prompt, under logits / T with T the
    temperature each response was sampled at (as verl and TRL do; None: T = 1), so ratios
    refer to the policy that sampled.

    Returns logp (B, R) and mask (B, R), R the longest response; right-padded.
    """
    device = next(model.parameters()).device
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width, rmax = max(lengths), max(1, max(len(r) for r in responses))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)  # (B, L)
    attn = torch.zeros_like(input_ids)
    index = torch.zeros((len(prompts), rmax), dtype=torch.long, device=device)  # (B, R) logit positions
    targets = torch.full((len(prompts), rmax), pad_id, dtype=torch.long, device=device)  # (B, R)
    mask = torch.zeros((len(prompts), rmax), dtype=torch.bool, device=device)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor(p + r, dtype=torch.long, device=device)
        input_ids[b, : len(seq)] = seq
        attn[b, : len(seq)] = 1
        if r:
            # the logits at position i predict token i + 1: response token j sits at len(p) + j
            index[b, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r), device=device)
            targets[b, : len(r)] = torch.tensor(r, dtype=torch.long, device=device)
            mask[b, : len(r)] = True
    temp = torch.tensor(temperatures or [1.0] * len(prompts), dtype=torch.float32, device=device)  # (B,)
    if isinstance(getattr(model, "module", model), ResponseLogprobs):
        # through the distributed wrapper's own forward: DDP / FSDP / DeepSpeed see the
        # forward that the backward follows (their gradient hooks depend on it)
        logp = model(input_ids, attn, index, targets, temp)
    else:
        logp = response_logprobs(model, input_ids, attn, index, targets, temp)
    return logp * mask, mask


def response_logprobs(model, input_ids: torch.Tensor, attn: torch.Tensor, index: torch.Tensor,
                      targets: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """log p(targets) at the logit positions `index`: input_ids, attn (B, L); index,
    targets (B, R); temp (B,). Returns (B, R)."""
    temp = temp[:, None, None]  # (B, 1, 1)
    rmax = index.size(1)
    parts = _decoder_and_head(model)
    if parts is None:  # a model whose head we cannot apply ourselves: full logits
        logits = model(input_ids=input_ids, attention_mask=attn).logits  # (B, L, V)
        picked = logits.gather(1, index[..., None].expand(-1, -1, logits.size(-1))).float()  # (B, R, V)
        return torch.log_softmax(picked / temp, dim=-1).gather(-1, targets[..., None]).squeeze(-1)  # (B, R)
    # memory-lean: the head only at response positions, LOGIT_CHUNK of them at a time, so
    # no (B, L, V) float32 logits exist (several GB per micro-batch at a 150k vocabulary)
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, attention_mask=attn).last_hidden_state  # (B, L, H)
    hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.size(-1)))  # (B, R, H)
    pieces = []
    for start in range(0, rmax, LOGIT_CHUNK):
        logits = head(hidden[:, start:start + LOGIT_CHUNK]).float() / temp  # (B, c, V)
        pieces.append(torch.log_softmax(logits, dim=-1).gather(
            -1, targets[:, start:start + LOGIT_CHUNK, None]).squeeze(-1))  # (B, c)
    return torch.cat(pieces, dim=1)  # (B, R)


class ResponseLogprobs(torch.nn.Module):
    """A causal LM whose forward is `response_logprobs`. The trainer hands this to
    accelerate to wrap, so the lean log-prob path runs inside the wrapper's forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attn, index, targets, temp):
        return response_logprobs(self.model, input_ids, attn, index, targets, temp)


LOGIT_CHUNK = 64  # response positions whose logits exist at once in sequence_logprobs


def _decoder_and_head(model):
    """(decoder returning last_hidden_state, lm_head) of a causal LM whose logits are just
    head(hidden); None for models that scale or cap their logits, or hide their parts."""
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def micro_batches(rows: list[int], lengths: list[int], size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Split length-sorted rows (indices; `lengths[i]` is row i's prompt + response tokens) into micro-batches of at most `size` rows and, when
    `max_tokens` is set, at most `max_tokens` padded tokens (rows x longest row).

    A long hindsight prompt padded together with 31 short rollouts costs as much as 32
    long sequences; the token bound gives long rows smaller micro-batches. The loss is a
    token sum over a fixed denominator, so the split changes speed and memory only."""
    out: list[list[int]] = []
    chunk: list[int] = []
    longest = 0
    for r in rows:
        n = lengths[r]
        if chunk and (len(chunk) >= size or (max_tokens and (len(chunk) + 1) * max(longest, n) > max_tokens)):
            out.append(chunk)
            chunk, longest = [], 0
        chunk.append(r)
        longest = max(longest, n)
    if chunk:
        out.append(chunk)
    return out


@dataclass
class Sequences:
    """The batch table's columns the update reads; one entry per sequence (batch row)."""

    prompt_id: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    advantage: list[float]
    is_hindsight: list[bool]
    temperature: list[float]  # the temperature log-probs are taken at (the row's own)
    engine_logprobs: list[list[float] | None]
    lengths: list[int] = field(init=False)  # prompt + response tokens
    prompts_trimmed: int = 0  # hindsight prompts left-trimmed to hindsight.max_train_prompt_tokens

    def __post_init__(self) -> None:
        self.lengths = [len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids)]

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Sequences:
        return cls(
            prompt_id=[r["prompt_id"] for r in rows],
            prompt_ids=[r["prompt_token_ids"] for r in rows],
            response_ids=[r["response_token_ids"] for r in rows],
            advantage=[float(r["advantage"]) for r in rows],
            is_hindsight=[bool(r["is_hindsight"]) for r in rows],
            temperature=[float(r["temperature"]) for r in rows],
            engine_logprobs=[r.get("engine_logprobs") for r in rows],
        )

    @classmethod
    def from_table(cls, table) -> Sequences:
        """From a batch table (pyarrow), one column at a time: no dict per row."""
        import pyarrow.compute as pc

        col = table.column
        engine = col("engine_logprobs").to_pylist() if "engine_logprobs" in table.column_names \
            else [None] * table.num_rows
        trimmed = int(pc.sum(col("prompt_trimmed")).as_py() or 0) if "prompt_trimmed" in table.column_names else 0
        return cls(prompt_id=col("prompt_id").to_pylist(), prompt_ids=col("prompt_token_ids").to_pylist(),
                   response_ids=col("response_token_ids").to_pylist(),
                   advantage=[float(a) for a in col("advantage").to_pylist()],
                   is_hindsight=[bool(h) for h in col("is_hindsight").to_pylist()],
                   temperature=[float(t) for t in col("temperature").to_pylist()], engine_logprobs=engine,
                   prompts_trimmed=trimmed)

    def __len__(self) -> int:
        return len(self.prompt_id)

    def response_length(self, i: int) -> int:
        return len(self.response_ids[i])

    def logprobs(self, model, idx: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """sequence_logprobs of the sequences `idx`: logp (B, R), mask (B, R)."""
        return sequence_logprobs(model, [self.prompt_ids[i] for i in idx], [self.response_ids[i] for i in idx],
                                 pad_id, [self.temperature[i] for i in idx])

    def engine_logprobs_of(self, idx: list[int], width: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's log-probs of sequences `idx`, right-padded to `width`: (B, width), and
        which rows have usable ones (B,): one per response token, and not a hindsight row
        (policy shaping has no behaviour-policy ratio)."""
        usable = []
        for i in idx:
            e = self.engine_logprobs[i]
            usable.append(e is not None and None not in e and len(e) == len(self.response_ids[i])
                          and not self.is_hindsight[i])
        lp = torch.zeros((len(idx), width), dtype=dtype)
        for b, (i, ok) in enumerate(zip(idx, usable)):
            row = self.engine_logprobs[i]
            if ok and row is not None:
                lp[b, : len(row)] = torch.tensor(row, dtype=dtype)
        return lp.to(device), torch.tensor(usable, device=device)


@dataclass
class Prepared:
    """Per-sequence tensors fixed for the whole update, by batch index; each (response length,)."""

    old: dict[int, torch.Tensor] = field(default_factory=dict)  # log-probs under the snapshot as loaded
    ref: dict[int, torch.Tensor] = field(default_factory=dict)  # under the KL reference (when kl_coef > 0)
    is_weight: dict[int, torch.Tensor] = field(default_factory=dict)  # truncated IS weights (when enabled)

    def padded(self, which: str, idx: list[int], width: int, device) -> torch.Tensor | None:
        """The stored tensors of sequences `idx`, right-padded with zeros: (B, width); None if not kept."""
        store = getattr(self, which)
        if not store:
            return None
        return torch.stack([torch.nn.functional.pad(store[i], (0, width - store[i].numel())) for i in idx]).to(device)

    def update(self, other: Prepared) -> None:
        for name in ("old", "ref", "is_weight"):
            getattr(self, name).update(getattr(other, name))


def shares(idx: list[int], world: int) -> list[list[int]]:
    """Deal length-sorted sequences to `world` processes round-robin: each process gets a
    share of similar lengths and size (within one), and together they hold every sequence once."""
    return [idx[rank::world] for rank in range(world)]


def batch_sequences(batch, rollouts, hindsight, max_prompt_tokens: int | None = None):
    """The batch's rows with their token lists (herl/sql/sequences.sql): Arrow tables or
    datasets of one iteration's batch, rollouts and hindsight; hindsight prompts trained on
    left-trimmed to `max_prompt_tokens` (hindsight.max_train_prompt_tokens; None: whole)."""
    from herl.sql import run_sql_file

    return run_sql_file("sequences", {"batch": batch, "rollouts": rollouts, "hindsight": hindsight},
                        {"max_prompt_tokens": max_prompt_tokens})


def load_sequences(run, k: int) -> Sequences:
    """Iteration k's training sequences, token lists joined from its rollouts and hindsight."""
    from schemas.tables import open_dataset

    tables = {n: open_dataset(n, run.table(k, n)) for n in ("batch", "rollouts", "hindsight")}
    table = batch_sequences(**tables, max_prompt_tokens=run.cfg.hindsight.max_train_prompt_tokens)
    if table.num_rows == 0:
        raise ValueError(f"{run.table(k, 'batch')}: the batch is empty; nothing to train on")
    return Sequences.from_table(table)
