"""Where a config's model.path lives and whether its weights can be read: `builtin:tiny`
(built here on first use), a named model installed by `herl init-model`, a Hugging Face
Hub id found in the Hugging Face cache (`herl init-model OWNER/NAME` fetches it), or a
local Hugging Face folder. Every part of herl resolves model paths through this module."""

from __future__ import annotations

import re
from pathlib import Path

from herl.models.store import NAMED_MODELS, named_model_dir, resolve_named
from herl.models.tiny import TINY_VERSION, build_tiny_model
from herl.util.home import herl_home
from schemas.errors import MissingError, UserError


def default_tiny_dir() -> Path:
    return herl_home() / "models" / f"tiny-{TINY_VERSION}"


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


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def hub_id(path: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when model.path names a Hugging Face Hub model as transformers
    users write it (`HuggingFaceTB/SmolLM2-135M-Instruct`, `owner/name@revision`) and no
    local folder of that name exists; None otherwise."""
    if path.startswith(("builtin:", "/", ".", "~")) or Path(path).expanduser().exists() or not HUB_ID.fullmatch(path):
        return None
    repo, _, revision = path.partition("@")
    return repo, revision or None


def hub_cache() -> Path:
    """The Hugging Face cache as huggingface_hub finds it now: HF_HUB_CACHE, HF_HOME/hub, or
    its default (read at each call, not when huggingface_hub was imported)."""
    import os

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub.constants import HF_HUB_CACHE

    return Path(HF_HUB_CACHE)


def hub_snapshot(repo: str, revision: str | None = None) -> Path | None:
    """The folder of a Hub model in the Hugging Face cache (HF_HOME / HF_HUB_CACHE), as
    huggingface_hub lays it out; None when it is not there. Never downloads: herl reads
    models from local disk at run time (`herl init-model OWNER/NAME` fetches one)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True, cache_dir=hub_cache()))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def fetch_hub_model(repo: str, revision: str | None = None) -> Path:
    """Download a Hub model into the Hugging Face cache (`herl init-model OWNER/NAME`)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=hub_cache()))
    except Exception as exc:  # noqa: BLE001 (offline, unknown repo, gated: huggingface_hub's many errors)
        raise MissingError(f"cannot download {repo} from the Hugging Face Hub ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); check the name, the network, "
                           "and HF_TOKEN for gated models") from None


def model_location(path: str) -> Path:
    """Where a config's model.path lives on disk, without building or checking anything."""
    if path == "builtin:tiny":
        return default_tiny_dir()
    if path.startswith("builtin:"):
        return named_model_dir(path.removeprefix("builtin:"))
    if (hub := hub_id(path)) is not None:
        return hub_snapshot(*hub) or Path(path)
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
        name = path.removeprefix("builtin:")
        if name not in NAMED_MODELS:
            raise MissingError(f"model.path {path!r}: unknown built-in model; use builtin:tiny or one of "
                                    + ", ".join(f"builtin:{n}" for n in NAMED_MODELS))
        out = resolve_named(name)
        if weights_problems(out):
            raise DamagedModelError(f"model.path {path!r}: {'; '.join(weights_problems(out))}: "
                                    f"reinstall it with `herl init-model {name}`")
        return out
    if (hub := hub_id(path)) is not None:
        found = hub_snapshot(*hub)
        if found is None:
            raise MissingError(f"model.path {path!r}: not in the Hugging Face cache ({hub_cache()}); herl reads "
                               f"models from local disk at run time: fetch it once with `herl init-model {path}` "
                               "(or `huggingface-cli download`), or give a local folder")
        path = str(found)
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
