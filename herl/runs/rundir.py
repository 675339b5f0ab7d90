"""The run directory: paths, the run lock, stage manifests, and skip-or-redo.

    runs/<run_id>/
        config.json                     resolved config of the latest start
        .lock                           held (flock) by the process writing the run
        snapshots/policy-<k>/           policy used by iteration k (k >= 1; 0 is model.path)
        iter-<k>/<table>.parquet        stage outputs (schemas.tables)
        iter-<k>/_manifests/<stage>.json

A manifest records the stage's status (running / done / failed), the fingerprints of
its inputs, the hash of the config parts it depends on, its outputs (fingerprint and
rows), and timings. A stage is skipped only when its manifest says done and inputs,
config and outputs all still match; otherwise it is redone from its inputs, and its
outputs replace whatever a killed attempt left (each output is written atomically).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from herl.models.snapshot import (
    SNAPSHOT_META,
    SnapshotAlteredError,
    SnapshotPrunedError,
    optimizer_unsealed,
    prune_snapshot,
    snapshot_meta,
    snapshot_problems,
    write_json_atomic,
)
from schemas.config import HerlConfig, load_config, stage_config_hash
from schemas.errors import MissingError, UserError
from schemas.tables import TABLES, digest_record, file_sha256, read_table, remember_digest


def recorded_outputs(run_path: Path, manifest_files=(), manifests: list[dict] | None = None) -> dict[Path, dict]:
    """{output file (resolved): the record its stage's manifest holds (path, sha256, size,
    times)} from the manifest files given (an unreadable one is passed over: its stage is
    redone on resume, its files hashed or read as they are), or from parsed `manifests`."""
    if manifests is None:
        manifests = []
        for mp in manifest_files:
            try:
                manifests.append(json.loads(Path(mp).read_bytes()))
            except (ValueError, OSError):
                continue
    out: dict[Path, dict] = {}
    for m in manifests:
        outputs = m.get("outputs") if isinstance(m, dict) else None
        for o in outputs.values() if isinstance(outputs, dict) else []:
            if isinstance(o, dict) and isinstance(o.get("path"), str) and isinstance(o.get("sha256"), str):
                out[(Path(run_path) / o["path"]).resolve()] = o
    return out

class RunLockedError(UserError, RuntimeError):
    """Another process is writing this run."""


def fingerprint(path: Path) -> str:
    """Content fingerprint of a table file or a model folder.

    Snapshots written by herl carry their id and the digest of every file in
    herl_snapshot.json; their fingerprint is that id once the files are checked against
    the digests (once per process), else "snapshot-altered:...", which matches no
    manifest, so the train stage that wrote the snapshot is redone. Other model folders
    are fingerprinted by file names, sizes and modification times (hashing many GB of
    weights that herl did not write, at every stage, would cost more than the stage).
    """
    if path.is_dir():
        meta = snapshot_meta(path)
        if meta:
            problems = snapshot_problems(path, meta)
            if problems:
                return "snapshot-altered:" + hashlib.sha256("\n".join(problems).encode()).hexdigest()[:16]
            return "snapshot:" + meta["snapshot_id"]  # a pruned snapshot keeps its id
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            st = f.stat()
            h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return "dir:" + h.hexdigest()[:24]
    return "sha256:" + file_sha256(path)[:24]


_held: dict[Path, int] = {}
_held_guard = threading.Lock()


@dataclass
class Run:
    path: Path
    cfg: HerlConfig

    def __post_init__(self) -> None:
        from herl.util.plugins import import_plugins

        import_plugins(self.cfg.plugins)

    @property
    def run_id(self) -> str:
        """The run's identity: config.json's run_id (a copied or renamed folder is the same
        run, and writes the same rows), the folder name for configs that lack one."""
        return self.cfg.run_id or self.path.name

    # ---- paths -------------------------------------------------------------
    @property
    def judge_cache(self) -> Path:
        """The LLM judge's verdict cache (SQLite), shared by every stage that grades."""
        return self.path / "judge_cache.sqlite"

    def iter_dir(self, k: int) -> Path:
        return self.path / f"iter-{k}"

    def table(self, k: int, name: str, stage: str | None = None) -> Path:
        return self.iter_dir(k) / TABLES[name].filename(stage)

    def manifest_path(self, k: int, stage: str) -> Path:
        return self.iter_dir(k) / "_manifests" / f"{stage}.json"

    def snapshot(self, k: int) -> Path:
        """Policy used by iteration k: the configured model for k = 0, else train's output of k-1."""
        if k == 0:  # a path only: the model is made ready (built / checked) before any stage runs
            from herl.models.paths import model_location

            return model_location(self.cfg.model.path)
        return self.path / "snapshots" / f"policy-{k}"

    def snapshot_id(self, k: int) -> str:
        return fingerprint(self.snapshot(k))

    def metric_rows(self, k: int, stages: list[str] | None = None) -> list[tuple[str, str, float]]:
        """Iteration k's metrics as (stage, name, value), stage by stage (default: the
        iteration's plan); a stage without a metrics table adds nothing."""
        rows = []
        for stage in self.cfg.iteration_stages(k) if stages is None else stages:
            path = self.table(k, "metrics", stage)
            if path.exists():
                rows += [(stage, r["name"], r["value"]) for r in read_table("metrics", path).to_pylist()]
        return rows

    def read_manifest(self, k: int, stage: str) -> dict | None:
        """The stage's manifest; None when it never ran. One that cannot be read (broken
        JSON, a damaged disk) reads as status `corrupt`, so the stage is redone."""
        p = self.manifest_path(k, stage)
        if not p.exists():
            return None
        try:
            m = json.loads(p.read_bytes())
        except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return {"status": "corrupt", "error": f"{p} cannot be read ({exc}); the stage is redone on resume"}
        if not isinstance(m, dict) or not isinstance(m.get("status"), str):
            return {"status": "corrupt", "error": f"{p} is not a herl manifest; the stage is redone on resume"}
        return m

    def output_problems(self, k: int, stage: str, deep: bool = True) -> list[str]:
        """What is wrong with the outputs of a stage marked done ([] when nothing): a file
        missing, or not what the stage wrote (fingerprint; for snapshots, when not `deep`,
        only the file sizes recorded at their save, which costs no hashing)."""
        m = self.read_manifest(k, stage) or {}
        self.recall_digests([], manifests=[m])
        problems = []
        for out in m.get("outputs", {}).values():
            p = self.path / out["path"]
            if not p.exists():
                problems.append(f"{out['path']} is missing")
            elif p.is_dir() and not deep:
                from herl.models.paths import weights_problems

                meta = snapshot_meta(p)
                sizes = {n: f["bytes"] for n, f in meta.get("files", {}).items()}
                if meta.get("corrupt") or (not meta.get("pruned") and (weights_problems(p) or any(
                        not (p / n).is_file() or (p / n).stat().st_size != b for n, b in sizes.items()))):
                    problems.append(f"{out['path']} does not match what was saved")
            elif fingerprint(p) != out["fingerprint"]:
                problems.append(f"{out['path']} is not what the stage wrote")
        return problems

    def _output_entry(self, p: Path, rows: int) -> dict:
        """A manifest's record of one output: its path, rows and fingerprint; for a file also
        its digest and stat (`digest_record`), so later processes need not hash it again."""
        entry = {"path": str(p.relative_to(self.path)), "rows": rows, "fingerprint": fingerprint(p)}
        return {**entry, **digest_record(p)} if p.is_file() else entry

    def recall_digests(self, paths, manifests: list[dict] | None = None) -> None:
        """Take the digests the manifests beside `paths` (or `manifests`) recorded for their
        outputs, for each file still unchanged since: fingerprinting a table the writing
        stage already hashed then reads no bytes (1M rollouts: 0.8 GB not read again)."""
        if manifests is None:
            files = [mp for folder in {Path(p).parent for p in paths if Path(p).is_file()}
                     for mp in sorted((folder / "_manifests").glob("*.json"))]
            records = recorded_outputs(self.path, files)
        else:
            records = recorded_outputs(self.path, manifests=manifests)
        for path, record in records.items():
            remember_digest(path, record)

    # ---- locking -----------------------------------------------------------
    @contextmanager
    def lock(self):
        """Hold the run's lock (re-entrant within a process). A second process gets RunLockedError."""
        key = self.path.resolve()
        with _held_guard:
            if key in _held:
                _held[key] += 1
                reentered = True
            else:
                reentered = False
        if reentered:
            try:
                yield
            finally:
                with _held_guard:
                    _held[key] -= 1
            return
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / ".lock"
        while True:
            fh = open(lock_path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                fh.close()
                raise RunLockedError(
                    f"run {self.path} is being written by another process ({holder}); "
                    "wait for it to finish or stop it before resuming"
                ) from None
            # the holder before us removes the file as it lets go: a lock on a removed file
            # is no lock, so take the one at the path now
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} since {datetime.now(UTC).isoformat(timespec='seconds')}\n")
        fh.flush()
        with _held_guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _held_guard:
                del _held[key]
            # removed while still held (a finished run leaves no .lock); one who opened it
            # meanwhile finds it gone once it gets the lock, and opens the path again
            (self.path / ".lock").unlink(missing_ok=True)
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def is_locked(self) -> bool:
        """Whether some process holds the run's lock now (it is being written)."""
        lock_path = self.path / ".lock"
        if not lock_path.exists():
            return False
        with open(lock_path) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False

    # ---- stages ------------------------------------------------------------
    def stage_is_current(self, k: int, stage: str, inputs: dict[str, str]) -> bool:
        m = self.read_manifest(k, stage)
        if not m or m.get("status") != "done":
            return False
        if m.get("config_hash") != stage_config_hash(self.cfg, stage) or m.get("inputs") != inputs:
            return False
        return not self.output_problems(k, stage)

    def run_stage(self, k: int, stage: str, inputs: dict[str, Path],
                  body: Callable[[], dict[str, tuple[Path, int]]]) -> dict:
        """Run `body` as stage `stage` of iteration k unless its manifest is current.

        `body` writes its outputs atomically and returns {name: (path, rows)}.
        Returns the manifest (with `skipped` true when nothing ran).
        """
        from herl.models.paths import resolve_model_path

        with self.lock():
            resolve_model_path(self.cfg.model.path)  # the initial policy is there (builtin:tiny: built on first use)
            self.recall_digests(inputs.values())
            fps = {name: fingerprint(p) for name, p in inputs.items()}
            for name, fp in fps.items():
                if fp.startswith("snapshot-altered:"):  # never train or sample from weights nobody saved
                    raise SnapshotAlteredError(
                        f"{inputs[name]} does not match what herl saved: {'; '.join(snapshot_problems(inputs[name]))}. "
                        "Resume the run (herl resume): the train stage that wrote it is redone first")
            if self.stage_is_current(k, stage, fps):
                return {**(self.read_manifest(k, stage) or {}), "skipped": True}
            for p in inputs.values():
                if p.is_dir() and snapshot_meta(p).get("pruned"):
                    raise SnapshotPrunedError(
                        f"iteration {k} {stage} must be redone, but it starts from {p}, which train.keep_snapshots "
                        "pruned; restore that snapshot, or start a new run from a kept one (model.path)")
            base = {
                "run_id": self.run_id, "iteration": k, "stage": stage, "inputs": fps,
                "config_hash": stage_config_hash(self.cfg, stage), "pid": os.getpid(),
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            attempts = (self.read_manifest(k, stage) or {}).get("attempts", 0) + 1
            self._remove_partial_files(k)
            mpath = self.manifest_path(k, stage)
            write_json_atomic(mpath, {**base, "status": "running", "attempts": attempts})
            t0 = time.perf_counter()
            try:
                outputs = body()
            except BaseException as exc:
                write_json_atomic(mpath, {**base, "status": "failed", "attempts": attempts,
                                          "seconds": round(time.perf_counter() - t0, 3),
                                          "error": "".join(traceback.format_exception_only(exc)).strip()})
                raise
            manifest = {
                **base, "status": "done", "attempts": attempts,
                "seconds": round(time.perf_counter() - t0, 3),
                "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "outputs": {name: self._output_entry(p, rows) for name, (p, rows) in outputs.items()},
            }
            write_json_atomic(mpath, manifest)
            return {**manifest, "skipped": False}


    def saved_snapshots(self) -> list[int]:
        """The iterations whose snapshot folders train wrote (sealed, pruned or not), ascending."""
        return sorted(int(p.name.split("-")[1]) for p in (self.path / "snapshots").glob("policy-*")
                      if p.name.split("-")[1].isdigit() and (p / SNAPSHOT_META).exists())

    def prune_snapshots(self, k: int) -> int:
        """Apply train.keep_snapshots / keep_every after train k wrote snapshot k + 1;
        returns the bytes freed.

        Kept: the newest `keep_snapshots` counting back from k + 1, every `keep_every`-th,
        and the final one. Only optimizer.pt goes from kept snapshots older than k + 1 (the
        next train stage needs only k + 1's). Only snapshots up to k are touched, each once
        every stage of its own iteration is done: when a resume redoes train j < k, the
        stale later snapshots are left alone until their own train stages are redone.
        A snapshot whose successor's optimizer state is not sealed yet (the resident trainer
        writes it after the stage) is kept whole: redoing its update is how that state is
        recovered if the trainer is stopped first (stages/train.complete_optimizer)."""
        t = self.cfg.train
        newest, freed = k + 1, 0
        for j in [j for j in self.saved_snapshots() if j <= k]:
            if not all((self.read_manifest(j, s) or {}).get("status") == "done" for s in self.cfg.iteration_stages(j)):
                continue
            if optimizer_unsealed(self.snapshot(j + 1)):
                continue
            folder = self.snapshot(j)
            meta = snapshot_meta(folder)
            keep = keeps_weights(j, newest, self.cfg.iterations, t.keep_snapshots, t.keep_every)
            if not keep and not meta.get("pruned"):
                freed += prune_snapshot(folder, optimizer_only=False)
            elif keep and not meta.get("pruned") and (folder / "optimizer.pt").exists():
                freed += prune_snapshot(folder, optimizer_only=True)
        return freed

    def _remove_partial_files(self, k: int) -> None:
        """Delete what a killed attempt left half-written (temporary files and folders).

        Safe because the caller holds the run lock: no other writer can own them."""
        for tmp in [*self.iter_dir(k).glob(".*.tmp"), *(self.path / "snapshots").glob(".policy-*")]:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def keeps_weights(j: int, newest: int, final: int, keep_snapshots: int | None, keep_every: int) -> bool:
    """Whether snapshot j keeps its weights once snapshot `newest` exists: one of the newest
    `keep_snapshots` (None: all), every `keep_every`-th (0: none), or the final one."""
    return (keep_snapshots is None or j > newest - keep_snapshots
            or (keep_every > 0 and j % keep_every == 0) or j == final)


def new_run_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + os.urandom(2).hex()


def open_run(cfg: HerlConfig, path: Path | None = None) -> Run:
    """Create (or reopen) cfg's run directory and save the resolved config in it. `path`:
    the folder of an existing run (resume), which may have been moved or renamed since;
    by default runs_dir / run_id."""
    run_id = cfg.run_id or new_run_id()
    cfg = cfg.model_copy(update={"run_id": run_id})
    path = Path(path) if path is not None else Path(cfg.runs_dir) / run_id
    run = Run(path=path.resolve(), cfg=cfg)
    with run.lock():
        write_json_atomic(run.path / "config.json", cfg.model_dump(mode="json"))
    return run


def load_run(path: str | Path) -> Run:
    """Open an existing run directory with its saved config."""
    path = Path(path).resolve()
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise MissingError(f"{path} is not a herl run directory (no config.json)")
    return Run(path=path, cfg=load_config(cfg_path))
