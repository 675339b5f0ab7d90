"""`builtin:tiny`: a small randomly initialised causal LM built locally (no model hub).

A Qwen2 architecture (hidden 128, 2 layers) with a byte-level tokenizer: 256 byte
tokens, no merges, chat special tokens and a ChatML template. Built deterministically
from a seed, so every machine gets the same weights. Saved in Hugging Face layout
(safetensors + tokenizer), it loads in transformers and in vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path

from schemas.errors import MissingError, UserError
from schemas.tables import atomic_directory

TINY_VERSION = "v1"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def herl_home() -> Path:
    return Path(os.environ.get("HERL_HOME", Path.home() / ".cache" / "herl"))


def default_tiny_dir() -> Path:
    return herl_home() / "models" / f"tiny-{TINY_VERSION}"


def build_tiny_model(out_dir: Path, *, hidden: int = 128, layers: int = 2, heads: int = 2,
                     intermediate: int = 384, seed: int = 0) -> Path:
    """Build the tiny model into out_dir atomically (written beside it, then renamed)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
        vocab = {ch: i for i, ch in enumerate(sorted(byte_to_unicode))}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(SPECIAL_TOKENS)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            bos_token=None, unk_token=None,
        )
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(tmp)

        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=len(fast), hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=4096, tie_word_embeddings=True,
            eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
            bos_token_id=None, torch_dtype="float32",
        )
        model = Qwen2ForCausalLM(config)
        model.generation_config.eos_token_id = config.eos_token_id
        model.generation_config.pad_token_id = config.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
    return out_dir


def weights_problems(folder: Path) -> list[str]:
    """Damaged safetensors files of a model folder ([] when none), read from their headers
    only (8 bytes of length, then a JSON table of tensors that must fit the file), so a
    check costs no hashing of weights."""
    import json

    problems = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 2 <= n <= size - 8:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(fh.read(n))
            ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
            if 8 + n + max(ends, default=0) > size:
                raise ValueError("tensors run past the end of the file (truncated)")
        except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
            problems.append(f"{f} is damaged ({exc})")
    return problems


def model_location(path: str) -> Path:
    """Where a config's model.path lives on disk, without building or checking anything."""
    if path == "builtin:tiny":
        return default_tiny_dir()
    if path.startswith("builtin:"):
        from herl.model_store import named_model_dir

        return named_model_dir(path.removeprefix("builtin:"))
    return Path(path).expanduser().resolve()


def resolve_model_path(path: str) -> Path:
    """Turn a config's model.path into a local folder that holds a model: builds
    `builtin:tiny` on first use (and again if its weights were damaged: it is made from a
    seed); a named model must be installed, a path must exist; damaged weights of either
    raise a DamagedModelError that names the file and what to do."""
    if path == "builtin:tiny":
        out = default_tiny_dir()
        if not (out / "config.json").exists() or weights_problems(out):
            # several processes may need it at once (parallel runs on a fresh machine): one
            # builds it, the others wait and use that copy. Two builds would each replace the
            # folder, changing its fingerprint under a run that had already recorded it.
            import fcntl

            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out.parent / f".{out.name}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (out / "config.json").exists() or weights_problems(out):
                    build_tiny_model(out)
        return out
    if path.startswith("builtin:"):
        from herl.model_store import NAMED_MODELS, resolve_named

        name = path.removeprefix("builtin:")
        if name not in NAMED_MODELS:
            raise MissingError(f"model.path {path!r}: unknown built-in model; use builtin:tiny or one of "
                                    + ", ".join(f"builtin:{n}" for n in NAMED_MODELS))
        out = resolve_named(name)
        if weights_problems(out):
            raise DamagedModelError(f"model.path {path!r}: {'; '.join(weights_problems(out))}: "
                                    f"reinstall it with `herl init-model {name}`")
        return out
    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise MissingError(
            f"model.path {path!r} is not a local Hugging Face model folder (no config.json); "
            "herl loads models from local paths only, or use 'builtin:tiny'"
        )
    if weights_problems(p):
        raise DamagedModelError(f"model.path {path!r}: {'; '.join(weights_problems(p))}: restore the model's "
                                "files (herl cannot rebuild a model it did not make)")
    return p.resolve()


class DamagedModelError(UserError):
    """The initial model's weights cannot be read, and herl cannot rebuild them."""
