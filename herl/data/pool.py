"""Prompt pools: the built-in toy task and prompts files in the project's own schema.

A pool is a list of prompt rows {prompt_id, messages, rubric, source}; the rollout stage
samples `prompts_per_iteration` of them per iteration and writes them to `prompts`.

`builtin:toy` is generated from the run seed: short writing prompts with 3-5 verifiable
rubric items (no capital letters, no digits, include a letter or word, length limits,
end with a character). A random byte-level policy meets about a third of the items;
the items reward behaviours a tiny model can learn within minutes on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from herl.data.importers import is_glob, load_prompts

TOPICS = ["the sea", "a cat", "rain", "the moon", "bread", "a river", "winter", "a garden",
          "music", "a train", "the wind", "a book", "coffee", "a forest", "snow", "the sun"]


def _toy_items(rng: random.Random) -> list[dict]:
    letter = rng.choice("aeinorst")
    max_chars = rng.choice([12, 16, 24])
    pool = [
        ("no_capitals", "Use no capital letters.", {}),
        ("no_digits", "Use no digits.", {}),
        ("include", f"Include the letter '{letter}'.", {"text": letter}),
        ("char_length", f"Use at most {max_chars} characters.", {"max": max_chars}),
        ("ends_with", "End with a period ('.').", {"text": "."}),
        ("exclude", "Do not use the letter 'x'.", {"text": "x"}),
    ]
    chosen = rng.sample(pool, rng.randint(3, 5))
    return [
        {"item_id": f"{kind}", "description": desc, "weight": 1.0, "kind": kind, "params": json.dumps(params)}
        for kind, desc, params in chosen
    ]


def builtin_toy(num_prompts: int, seed: int) -> list[dict]:
    rng = random.Random(f"toy:{seed}")
    rows = []
    for i in range(num_prompts):
        items = _toy_items(rng)
        rules = " ".join(it["description"] for it in items)
        text = f"Write a short line about {rng.choice(TOPICS)}. {rules}"
        rows.append({
            "prompt_id": f"toy-{i:04d}",
            "messages": [{"role": "user", "content": text}],
            "rubric": items,
            "source": "builtin:toy",
        })
    return rows


def load_pool(source: str, num_prompts: int, seed: int, fmt: str = "auto",
              drop_unsupported: bool = False, columns: dict[str, str] | None = None,
              split: str = "train") -> list[dict]:
    if source == "builtin:toy":
        return builtin_toy(num_prompts, seed)
    if source == "builtin:ifgen":
        from herl.data.ifgen import builtin_ifgen

        return builtin_ifgen(num_prompts, seed)
    return load_prompts(Path(source), fmt, drop_unsupported, columns, split)


def task_pool(cfg) -> list[dict]:
    """The whole prompt pool of a config's task section (before the held-out split)."""
    t = cfg.task
    return load_pool(t.source, t.num_prompts, cfg.seed, t.format, t.drop_unsupported, t.columns, t.split)


def task_files(source: str) -> list[Path]:
    """The files (or datasets folder) a task.source reads: the rollout stage's inputs, so
    a changed prompts file redoes it."""
    if source.startswith("builtin:"):
        return []
    if is_glob(source):
        import glob

        return [Path(f) for f in sorted(glob.glob(source))]
    return [Path(source)]


def split_pool(pool: list[dict], holdout: int, seed: int, where: str = "task.source") -> tuple[list[dict], list[dict]]:
    """(training prompts, held-out prompts): `holdout` prompts chosen by a seeded hash of
    their ids, so the split does not depend on the pool's order and never changes for a
    run. Both parts keep the pool's order."""
    if holdout <= 0:
        return pool, []
    if holdout >= len(pool):
        raise ValueError(f"{where}: task.holdout = {holdout} leaves no training prompts in a pool of {len(pool)}; "
                         f"set task.holdout below {len(pool)}")
    ranked = sorted(pool, key=lambda p: hashlib.sha256(f"holdout:{seed}:{p['prompt_id']}".encode()).hexdigest())
    held = {p["prompt_id"] for p in ranked[:holdout]}
    return [p for p in pool if p["prompt_id"] not in held], [p for p in pool if p["prompt_id"] in held]


def sample_for_iteration(pool: list[dict], k: int, per_iteration: int, seed: int) -> list[dict]:
    """Epoch-wise sampling without replacement: iteration k takes the next slice of a
    per-epoch shuffle of the pool, so every prompt is seen once per epoch."""
    out = []
    orders: dict[int, list[int]] = {}  # one shuffle per epoch touched (at most two or so)
    start = k * per_iteration
    for pos in range(start, start + per_iteration):
        epoch, idx = divmod(pos, len(pool))
        if epoch not in orders:
            order = list(range(len(pool)))
            random.Random(f"epoch:{seed}:{epoch}").shuffle(order)
            orders[epoch] = order
        out.append(pool[orders[epoch][idx]])
    # a pool smaller than a batch would repeat a prompt inside one iteration: keep one copy
    seen, unique = set(), []
    for row in out:
        if row["prompt_id"] not in seen:
            seen.add(row["prompt_id"])
            unique.append(row)
    return unique


def drop_overlong(prompts: list[dict], tokenizer, max_tokens: int | None) -> tuple[list[dict], int]:
    """(the prompts whose chat-templated text, with the generation prompt, is at most
    `max_tokens` tokens; how many were dropped): the reference's
    data.filter_overlong_prompts. None keeps every prompt."""
    if max_tokens is None:
        return prompts, 0
    from herl.generation.engines import render_chat

    kept = [p for p in prompts if len(render_chat(tokenizer, p["messages"])[1]) <= max_tokens]
    return kept, len(prompts) - len(kept)


def training_pool(cfg, tokenizer=None, pool: list[dict] | None = None) -> tuple[list[dict], int]:
    """(the prompts a run trains on, prompts dropped as too long): the pool less the
    held-out prompts (task.holdout), less those over task.max_prompt_tokens under the
    initial model's tokenizer (`tokenizer`, loaded when not given and needed). Held-out
    prompts are never dropped: the split does not depend on the length rule. `pool`: the
    whole pool when the caller has it loaded already."""
    pool, _ = split_pool(task_pool(cfg) if pool is None else pool, cfg.task.holdout, cfg.seed,
                         cfg.task.source)  # held-out prompts never train
    if cfg.task.max_prompt_tokens is None:
        return pool, 0
    if tokenizer is None:
        from herl.models.paths import resolve_model_path
        from herl.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(resolve_model_path(cfg.model.path))
    kept, dropped = drop_overlong(pool, tokenizer, cfg.task.max_prompt_tokens)
    if not kept:
        raise ValueError(f"task.source {cfg.task.source}: every training prompt is longer than task.max_prompt_tokens "
                         f"= {cfg.task.max_prompt_tokens} tokens; raise it or unset it")
    return kept, dropped


def planned_iterations(cfg, training_prompts: int) -> int:
    """The run's iterations: `iterations`, or, with task.epochs, enough for that many passes
    over `training_prompts` at prompts_per_iteration each (a pool smaller than a batch is
    one pass an iteration)."""
    import math

    if cfg.task.epochs is None:
        return cfg.iterations
    per = min(cfg.task.prompts_per_iteration, training_prompts)
    return max(1, math.ceil(cfg.task.epochs * training_prompts / per - 1e-9))


def with_planned_iterations(cfg, training_prompts: int):
    """cfg with task.epochs turned into `iterations` (planned_iterations), epochs unset: what
    a run saves, so that resuming it plans the same iterations."""
    if cfg.task.epochs is None:
        return cfg
    from schemas.config import HerlConfig

    data = cfg.model_dump(mode="json")
    data["iterations"] = planned_iterations(cfg, training_prompts)
    data["task"]["epochs"] = None
    return HerlConfig.model_validate(data)


def evaluation_prompts(cfg) -> list[dict]:
    """The prompts of the held-out evaluation: evaluation.source's (any supported format),
    else the pool's held-out ones; at most evaluation.limit, a seeded choice in file order."""
    ev = cfg.evaluation
    if ev.source is not None:
        prompts = load_prompts(ev.source)
    else:
        pool = task_pool(cfg)
        _, prompts = split_pool(pool, cfg.task.holdout, cfg.seed, cfg.task.source)
    if ev.limit is not None and len(prompts) > ev.limit:
        keep = set(sorted(range(len(prompts)),
                          key=lambda i: hashlib.sha256(f"eval:{cfg.seed}:{prompts[i]['prompt_id']}".encode()).hexdigest())
                   [:ev.limit])
        prompts = [p for i, p in enumerate(prompts) if i in keep]
    return prompts


_SAID: set[tuple] = set()


def _probe_judge(cfg, pool: list[dict]) -> None:
    """grade.judge.probe: a run with judge items asks its judge items of known answer first."""
    from herl.grading.judge import check_judge

    check_judge(cfg.grade, [p["rubric"] for p in pool])


def check_pool_fits(cfg) -> int:
    """Load the run's prompt pool and refuse it, before anything starts, when a prompt
    plus the longest answer the run asks for does not fit the initial model's context
    (PromptTooLongError naming the prompts; prompts over task.max_prompt_tokens are dropped
    first, as the rollout stage drops them), and when its prompts have judge items, asks the
    judge items of known answer (grade.judge.probe). Returns the training pool's size (after
    task.holdout and task.max_prompt_tokens)."""
    import sys

    from herl.generation.engines import (
        GenRequest,
        check_prompt_lengths,
        context_length,
        render_chat,
    )
    from herl.models.paths import resolve_model_path
    from herl.models.tokenizer import load_tokenizer

    model = resolve_model_path(cfg.model.path)
    tokenizer = None  # loaded once, where the length rule or the context check needs it
    if cfg.task.max_prompt_tokens is not None:
        tokenizer = load_tokenizer(model)
    pool = task_pool(cfg)
    train, _ = training_pool(cfg, tokenizer, pool)
    pool = train + split_pool(pool, cfg.task.holdout, cfg.seed, cfg.task.source)[1]  # what the run uses
    said = (cfg.task.source, cfg.task.prompts_per_iteration, len(train))
    if cfg.task.prompts_per_iteration > len(train) and said not in _SAID:  # sample_for_iteration keeps one copy of each
        _SAID.add(said)  # once: the pre-flight check and the flow both run this
        print(f"herl: task.prompts_per_iteration = {cfg.task.prompts_per_iteration}, but the training pool holds "
              f"{len(train)} prompts: each iteration uses those {len(train)}", file=sys.stderr, flush=True)
    limit = context_length(model, cfg.vllm.max_model_len)
    if limit is None:
        _probe_judge(cfg, pool)
        return len(train)
    tokenizer = tokenizer or load_tokenizer(model)

    def check(prompts: list[dict], budget: int, where: str) -> None:
        requests = [GenRequest(p["prompt_id"], render_chat(tokenizer, p["messages"])[1], 0, 1) for p in prompts]
        check_prompt_lengths(requests, budget, limit, model, where=where)

    check(pool, max(cfg.rollout.max_tokens, cfg.hindsight.max_tokens or 0, cfg.evaluation.max_tokens or 0),
          f"task.source {cfg.task.source}: ")
    _probe_judge(cfg, pool)
    if cfg.evaluation.every > 0 and cfg.evaluation.source is not None:
        check(evaluation_prompts(cfg), cfg.evaluation.max_tokens or cfg.rollout.max_tokens,
              f"evaluation.source {cfg.evaluation.source}: ")
    return len(train)

