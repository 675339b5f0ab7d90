"""Loading a model folder's tokenizer, and keeping transformers quiet while loading."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(path: Path):
    """The folder's tokenizer, with the EOS token as padding when it names none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def quiet_transformers() -> None:
    """Silence transformers' warnings and progress bars (herl prints its own progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
