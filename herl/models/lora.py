"""LoRA snapshots: the adapter on disk, a merged model for the engines, and export.

With train.lora.rank > 0 a snapshot holds only the adapter (peft's adapter_config.json
and adapter_model.safetensors, MBs) on top of the run's initial policy, recorded as
`base` in its herl_snapshot.json. The generation engines get a merged copy (base + the
adapter folded into its weights): both engines then run a plain model at full speed, and
vLLM needs no LoRA kernels; the copy costs one merge (seconds) and one model's disk,
held only for the snapshot being generated from (runs/<id>/cache/merged/).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from schemas.tables import atomic_directory, public_files

ADAPTER_CONFIG = "adapter_config.json"
MERGED_STAMP = "herl_merged_from.json"  # in a merged copy: the adapter snapshot it was made from


def is_adapter(snapshot: Path) -> bool:
    """Whether `snapshot` is a LoRA adapter (not a whole model)."""
    return (Path(snapshot) / ADAPTER_CONFIG).exists()


def adapter_base(snapshot: Path) -> Path:
    """The model a LoRA snapshot adapts: `base` in its metadata, else peft's record."""
    from herl.models.snapshot import snapshot_meta

    meta = snapshot_meta(snapshot)
    if meta.get("base"):
        return Path(meta["base"])
    return Path(json.loads((Path(snapshot) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"])


def write_merged(snapshot: Path, dest: Path, dtype: str = "float32", extra: dict[str, str] | None = None) -> Path:
    """Write base + adapter, merged, as a plain HF model folder at `dest` (atomically),
    with `extra` text files (name: text) beside it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from herl.models.tokenizer import load_tokenizer

    base = adapter_base(snapshot)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, snapshot).merge_and_unload()
    with atomic_directory(dest) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(snapshot).save_pretrained(tmp)
        (tmp / MERGED_STAMP).write_text(json.dumps({"adapter": str(Path(snapshot).resolve()),
                                                    "stamp": _stamp(snapshot), "base": str(base)}))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    public_files(dest)  # a model to share: readable as any file the user writes
    return dest


def _stamp(snapshot: Path) -> list:
    # the adapter's identity on disk: a redone train stage writes a new file
    st = (Path(snapshot) / "adapter_model.safetensors").stat()
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def engine_model(snapshot: Path, dtype: str = "float32") -> Path:
    """The folder an engine loads for `snapshot`: itself, or for a LoRA snapshot inside a
    run its merged copy in the run's cache (made on first use; older copies removed)."""
    snapshot = Path(snapshot)
    if not is_adapter(snapshot):
        return snapshot
    cache = snapshot.parent.parent / "cache" / "merged"
    dest = cache / snapshot.name
    stamp = dest / MERGED_STAMP
    if stamp.exists() and json.loads(stamp.read_text()).get("stamp") == _stamp(snapshot):
        return dest
    for old in cache.glob("*") if cache.exists() else ():
        if old != dest:  # one merged copy at a time: only the current snapshot generates
            shutil.rmtree(old, ignore_errors=True)
    return write_merged(snapshot, dest, dtype)


def export_policy(snapshot: Path, dest: Path, dtype: str = "float32", extra: dict[str, str] | None = None) -> Path:
    """Write a snapshot as a plain HF model folder at `dest` (a new folder, atomically):
    a LoRA snapshot merged into its base, a full one without herl's optimizer state and
    metadata; `extra` text files (a model card) go in with it."""
    from herl.models.snapshot import OPTIMIZER_FILE, OPTIMIZER_PARTIAL, SNAPSHOT_META

    snapshot, dest = Path(snapshot), Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; export writes a new folder (remove it or choose another)")
    if is_adapter(snapshot):
        write_merged(snapshot, dest, dtype, extra)
        (dest / MERGED_STAMP).unlink()
        public_files(dest)
        return dest
    with atomic_directory(dest) as tmp:
        for f in snapshot.iterdir():
            if f.is_file() and f.name not in (OPTIMIZER_FILE, OPTIMIZER_PARTIAL, SNAPSHOT_META):
                shutil.copy2(f, tmp / f.name)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    public_files(dest)  # a model to share: readable as any file the user writes
    return dest
