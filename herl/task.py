"""Prompt pools: the built-in toy task and prompts files in the project's own schema.

A pool is a list of prompt rows {prompt_id, messages, rubric, source}; the rollout stage
samples `prompts_per_iteration` of them per iteration and writes them to `prompts`.

`builtin:toy` is generated from the run seed: short writing prompts with 3-5 verifiable
rubric items (no capital letters, no digits, include a letter or word, length limits,
end with a character). A random byte-level policy meets about a third of the items;
the items reward behaviours a tiny model can learn within minutes on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq

from herl.grading import CHECKS

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


class PromptFileError(ValueError):
    """A prompts file row is invalid; the message names file, row and field."""


def _validate(row: dict, where: str) -> dict:
    def fail(field: str, msg: str):
        raise PromptFileError(f"{where}: field '{field}': {msg}")

    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not isinstance(row.get("prompt_id"), str) or not row["prompt_id"]:
        fail("prompt_id", "must be a non-empty string")
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        fail("messages", "must be a non-empty list of {role, content}")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            fail(f"messages[{j}]", "must be an object with string 'role' and 'content'")
    rubric = row.get("rubric")
    if not isinstance(rubric, list) or not rubric:
        fail("rubric", "must be a non-empty list of rubric items")
    items = []
    for j, it in enumerate(rubric):
        if not isinstance(it, dict):
            fail(f"rubric[{j}]", "must be an object")
        for key in ("item_id", "description", "kind"):
            if not isinstance(it.get(key), str) or not it[key]:
                fail(f"rubric[{j}].{key}", "must be a non-empty string")
        if it["kind"] not in CHECKS:
            fail(f"rubric[{j}].kind", f"unknown kind {it['kind']!r}; registered: {sorted(CHECKS)}")
        weight = it.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            fail(f"rubric[{j}].weight", "must be a number")
        params = it.get("params") or {}
        if isinstance(params, str):
            try:
                params = json.loads(params)
            except json.JSONDecodeError as exc:
                fail(f"rubric[{j}].params", f"is not valid JSON: {exc}")
        if not isinstance(params, dict):
            fail(f"rubric[{j}].params", "must be an object")
        items.append({"item_id": it["item_id"], "description": it["description"], "weight": float(weight),
                      "kind": it["kind"], "params": json.dumps(params, sort_keys=True)})
    return {"prompt_id": row["prompt_id"], "messages": [{"role": m["role"], "content": m["content"]} for m in msgs],
            "rubric": items, "source": str(row.get("source") or "")}


def load_prompt_file(path: Path) -> list[dict]:
    """Read a prompts file (.jsonl or .parquet) and validate every row."""
    if not path.exists():
        raise PromptFileError(f"{path}: prompts file not found")
    if path.suffix == ".parquet":
        raw = [(f"{path} row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    elif path.suffix in (".jsonl", ".json"):
        raw = []
        with open(path) as fh:
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    raw.append((f"{path} line {i}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise PromptFileError(f"{path} line {i}: not valid JSON: {exc}") from None
    else:
        raise PromptFileError(f"{path}: unsupported prompts file type {path.suffix!r}; use .jsonl or .parquet")
    rows, seen = [], {}
    for where, r in raw:
        row = _validate(r, where)
        if row["prompt_id"] in seen:
            raise PromptFileError(f"{where}: field 'prompt_id': duplicate {row['prompt_id']!r} (first at {seen[row['prompt_id']]})")
        seen[row["prompt_id"]] = where
        row["source"] = row["source"] or str(path)
        rows.append(row)
    if not rows:
        raise PromptFileError(f"{path}: no prompts")
    return rows


def load_pool(source: str, num_prompts: int, seed: int) -> list[dict]:
    if source == "builtin:toy":
        return builtin_toy(num_prompts, seed)
    return load_prompt_file(Path(source))


def sample_for_iteration(pool: list[dict], k: int, per_iteration: int, seed: int) -> list[dict]:
    """Epoch-wise sampling without replacement: iteration k takes the next slice of a
    per-epoch shuffle of the pool, so every prompt is seen once per epoch."""
    out = []
    start = k * per_iteration
    for pos in range(start, start + per_iteration):
        epoch, idx = divmod(pos, len(pool))
        order = list(range(len(pool)))
        random.Random(f"epoch:{seed}:{epoch}").shuffle(order)
        out.append(pool[order[idx]])
    # a pool smaller than a batch would repeat a prompt inside one iteration: keep one copy
    seen, unique = set(), []
    for row in out:
        if row["prompt_id"] not in seen:
            seen.add(row["prompt_id"])
            unique.append(row)
    return unique
