"""`builtin:tiny`: a small randomly initialised causal LM built locally (no model hub).

A Qwen2 architecture (hidden 128, 2 layers) with a byte-level tokenizer: 256 byte
tokens, no merges, chat special tokens and a ChatML template. Built deterministically
from a seed, so every machine gets the same weights. Saved in Hugging Face layout
(safetensors + tokenizer), it loads in transformers and in vLLM.
"""

from __future__ import annotations

from pathlib import Path

from schemas.tables import atomic_directory

TINY_VERSION = "v1"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
