"""A policy snapshot on disk: its metadata file (herl_snapshot.json) with the size and
sha256 of every file, sealing, checking and pruning. Used by the run store, the trainer
and LoRA export; imports nothing of herl's."""

from __future__ import annotations

import json
from pathlib import Path

from schemas.errors import UserError
from schemas.tables import atomic_write, digest_record, remember_digest

SNAPSHOT_META = "herl_snapshot.json"
OPTIMIZER_FILE = "optimizer.pt"  # the AdamW state the next update continues from
# a deferred write in progress (never part of the snapshot); the same stem as optimizer.pt,
# because torch.save names the archive inside the file after it: the bytes are then identical
OPTIMIZER_PARTIAL = "optimizer.partial"


def write_json_atomic(path: Path, data: dict) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)


class SnapshotAlteredError(UserError, RuntimeError):
    """A snapshot's files no longer match the digests recorded when it was saved."""


def snapshot_files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative path: {bytes, sha256, stat}} of every file of a snapshot but its metadata.
    Sealed with the metadata, `stat` lets a later process that finds a file unchanged
    (inode, size, mtime, ctime) take its digest from there instead of hashing gigabytes of
    weights again (`remember_digest`)."""
    return {str(f.relative_to(folder)): {"bytes": f.stat().st_size, **digest_record(f)}
            for f in sorted(p for p in folder.rglob("*") if p.is_file() and not _not_sealed(p.name, skip))}


def _not_sealed(name: str, skip: tuple[str, ...]) -> bool:
    """Files of a snapshot folder its seal leaves out: the metadata, the metadata's own
    atomic-write temporary (the resident trainer rewrites it beside a reading stage) and a
    deferred optimizer write in progress."""
    return name in (SNAPSHOT_META, OPTIMIZER_PARTIAL, *skip) or name.startswith(f".{SNAPSHOT_META}.")


def seal_snapshot(folder: Path, meta: dict) -> None:
    """Write the snapshot's metadata with the size and digest of each of its files. With
    meta["optimizer_deferred"] the optimizer state is not there yet: the resident trainer
    writes it after the stage returns (`write_deferred_optimizer`)."""
    write_json_atomic(folder / SNAPSHOT_META, {**meta, "files": snapshot_files(folder)})


def optimizer_unsealed(folder: Path) -> bool:
    """Whether the snapshot's optimizer state was deferred and never sealed (a trainer
    killed before or during its write): the update that made the snapshot must be redone
    to get it back (stages/train.py)."""
    return bool(snapshot_meta(folder).get("optimizer_deferred"))


def write_deferred_optimizer(folder: Path, save) -> None:
    """Write a sealed snapshot's deferred optimizer state: `save(path)` writes it to a
    partial file, which is flushed, renamed to optimizer.pt and recorded in the metadata.
    A kill at any point leaves the snapshot's weights sealed and its optimizer unsealed
    (the partial file and an unrecorded optimizer.pt are ignored), never half a state read
    as whole."""
    import os

    partial = folder / OPTIMIZER_PARTIAL
    save(partial)
    with open(partial, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, folder / OPTIMIZER_FILE)
    seal_optimizer(folder)


def seal_optimizer(folder: Path) -> None:
    """Record optimizer.pt's size and digest in the snapshot's metadata (one atomic write:
    before it the state is unsealed, after it part of the snapshot)."""
    meta = snapshot_meta(folder)
    f = folder / OPTIMIZER_FILE
    meta["files"] = {**meta.get("files", {}), OPTIMIZER_FILE: {"bytes": f.stat().st_size, **digest_record(f)}}
    meta.pop("optimizer_deferred", None)
    write_json_atomic(folder / SNAPSHOT_META, meta)


class SnapshotPrunedError(UserError, RuntimeError):
    """A stage must be redone but the snapshot it starts from was pruned (train.keep_snapshots)."""


def prune_snapshot(folder: Path, optimizer_only: bool) -> int:
    """Free a snapshot's disk; returns the bytes freed. optimizer_only drops optimizer.pt
    (only the newest snapshot needs it to continue AdamW); otherwise every file goes and
    herl_snapshot.json stays as a tombstone with the snapshot's id, so the manifests that
    name it still verify. The metadata is rewritten first: a kill midway leaves a folder
    whose leftovers the next pruning removes."""
    meta = snapshot_meta(folder)
    if optimizer_only:
        meta["files"] = {n: f for n, f in meta.get("files", {}).items() if n != OPTIMIZER_FILE}
        meta["optimizer_pruned"] = True
        victims = [folder / OPTIMIZER_FILE]
    else:
        meta.update(files={}, pruned=True)
        victims = [p for p in folder.rglob("*") if p.is_file() and p.name != SNAPSHOT_META]
    write_json_atomic(folder / SNAPSHOT_META, meta)
    freed = 0
    for p in victims:
        if p.exists():
            freed += p.stat().st_size
            p.unlink()
    return freed


def snapshot_meta(folder: Path) -> dict:
    """A snapshot's herl_snapshot.json ({} when absent). An unreadable one reads as
    {"files": {}}: the snapshot then does not verify (every file is 'not part of it'), so
    the train stage that wrote it is redone."""
    p = folder / SNAPSHOT_META
    if not p.exists():
        return {}
    try:
        meta = json.loads(p.read_bytes())
    except (ValueError, OSError):
        return {"files": {}, "corrupt": True}
    return meta if isinstance(meta, dict) else {"files": {}, "corrupt": True}


def snapshot_problems(folder: Path, meta: dict | None = None) -> list[str]:
    """What differs between a snapshot's files and the digests recorded at its save ([] when none)."""
    meta = snapshot_meta(folder) if meta is None else meta
    if meta.get("pruned"):
        return []
    recorded = meta.get("files")
    if recorded is None:
        return ["no file digests recorded (a snapshot from an older herl)"]
    for name, want in recorded.items():
        if isinstance(want, dict):
            remember_digest(folder / name, want)
    # a deferred optimizer state not sealed yet (being written, or its writer killed) is not part of the seal
    actual = snapshot_files(folder, skip=(OPTIMIZER_FILE,) if meta.get("optimizer_deferred") else ())
    problems = [f"{name} is missing" for name in recorded if name not in actual]
    problems += [f"{name} was not part of the saved snapshot" for name in actual if name not in recorded]
    for name, want in recorded.items():
        got = actual.get(name)
        if got is None:
            continue
        if got["bytes"] != want["bytes"]:
            problems.append(f"{name} has {got['bytes']} bytes, {want['bytes']} when saved (truncated or replaced)")
        elif got["sha256"] != want["sha256"]:
            problems.append(f"{name} changed since it was saved (sha256 differs)")
    return problems
