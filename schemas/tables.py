"""Table contracts: one pyarrow schema per table, with its grain.

Every stage reads and writes its tables through `read_table` / `write_table`, which check
the schema on the way in and out. Files are written atomically (temporary file, fsync,
rename), so a table on disk is either complete or absent.

Layout inside a run directory (see herl.runs.rundir):
    iter-<k>/<table>.parquet           prompts, rollouts, verdicts, rewards, hindsight,
                                       hindsight_verdicts, batch; heldout_answers and
                                       heldout_metrics where policy k was evaluated
    iter-<k>/metrics-<stage>.parquet   one metrics file per stage, seen as one view `metrics`
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.errors import DiskError, UserError, disk_error, no_space, out_of_space

_ids = [("run_id", pa.string()), ("iteration", pa.int32())]
_tokens = pa.list_(pa.int32())
_generation = [
    ("prompt_token_ids", _tokens),
    ("response_text", pa.string()),
    ("response_token_ids", _tokens),
    ("finish_reason", pa.string()),
    ("num_tokens", pa.int32()),
    ("seed", pa.int64()),
    ("snapshot_id", pa.string()),
    ("logprobs", pa.list_(pa.float32())),
    # the temperature the answer was sampled at (1 for greedy): its log-probs are at it
    ("temperature", pa.float64()),
]
_score = [
    ("reward", pa.float64()),
    ("items_met", pa.int32()),
    # the items the reward is over: all of the rubric, less the unknown ones under
    # grade.unknown_policy = drop (eval_answers / graded_rows' items_total counts all items)
    ("items_scored", pa.int32()),
    ("items_unknown", pa.int32()),
    # the answer loops: its last 160 characters occur 3+ times in it (the reference's
    # repetition rule, herl.grading.rubric.is_looping); hindsight.skip_looping uses it
    ("looped", pa.bool_()),
]

# the self-improvement evaluation (`herl eval`, and the held-out evaluation inside a run)
_EVAL_ANSWER = [
    ("round", pa.int32()), ("prompt_id", pa.string()), ("answer_text", pa.string()),
    ("revised", pa.bool_()), ("items_total", pa.int32()), ("items_met_strict", pa.int32()),
    ("items_met_loose", pa.int32()), ("items_unknown", pa.int32()),
    ("reward_strict", pa.float64()), ("reward_loose", pa.float64()),
    ("all_met_strict", pa.bool_()), ("all_met_loose", pa.bool_()),
]
_EVAL_METRIC = [("round", pa.int32()), ("name", pa.string()), ("value", pa.float64())]

RUBRIC_ITEM = pa.struct(
    [
        ("item_id", pa.string()),
        ("description", pa.string()),
        ("weight", pa.float64()),
        ("kind", pa.string()),
        ("params", pa.string()),  # JSON object with the check's arguments
    ]
)
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

_verdict_fields = [
    *_ids,
    ("sample_id", pa.string()),
    ("prompt_id", pa.string()),
    ("item_index", pa.int32()),
    ("item_id", pa.string()),
    ("verdict", pa.string()),  # the verdict rewards use (grade.mode)
    ("verdict_strict", pa.string()),
    ("verdict_loose", pa.string()),
    ("weight", pa.float64()),
    ("grader", pa.string()),
    ("detail", pa.string()),
]


@dataclass(frozen=True)
class Table:
    name: str
    grain: str
    schema: pa.Schema
    key: tuple[str, ...]
    per_stage: bool = False  # one file per stage (metrics) rather than one per iteration

    def filename(self, stage: str | None = None) -> str:
        return f"{self.name}-{stage}.parquet" if self.per_stage else f"{self.name}.parquet"


TABLES: dict[str, Table] = {
    t.name: t
    for t in [
        Table(
            "prompts",
            "one row per (iteration, prompt_id): the prompts sampled for this iteration",
            pa.schema([*_ids, ("prompt_id", pa.string()), ("messages", pa.list_(MESSAGE)),
                       ("rubric", pa.list_(RUBRIC_ITEM)), ("source", pa.string())]),
            ("iteration", "prompt_id"),
        ),
        Table(
            "rollouts",
            "one row per (iteration, prompt_id, sample_index): a sampled answer",
            pa.schema([*_ids, ("rollout_id", pa.string()), ("prompt_id", pa.string()),
                       ("sample_index", pa.int32()), ("prompt_text", pa.string()), *_generation]),
            ("iteration", "rollout_id"),
        ),
        Table(
            "verdicts",
            "one row per (rollout, rubric item): met / unmet / unknown",
            pa.schema(_verdict_fields),
            ("iteration", "sample_id", "item_index"),
        ),
        Table(
            "rewards",
            "one row per rollout: its reward and item counts",
            pa.schema([*_ids, ("rollout_id", pa.string()), ("prompt_id", pa.string()), *_score]),
            ("iteration", "rollout_id"),
        ),
        Table(
            "hindsight",
            "one row per revision of a hindsight candidate, with its reward",
            pa.schema([*_ids, ("revision_id", pa.string()), ("candidate_rollout_id", pa.string()),
                       ("prompt_id", pa.string()), ("revision_index", pa.int32()),
                       ("hindsight_prompt_text", pa.string()), *_generation, *_score]),
            ("iteration", "revision_id"),
        ),
        Table(
            "hindsight_verdicts",
            "one row per (revision, rubric item): met / unmet / unknown",
            pa.schema(_verdict_fields),
            ("iteration", "sample_id", "item_index"),
        ),
        Table(
            "batch",
            "one row per training sequence of the mixed groups (what the train stage consumes; "
            "its token lists are the rows of rollouts / hindsight it refers to)",
            pa.schema([*_ids, ("sample_id", pa.string()),
                       # the rollout trained (a rollout row), copied (a duplicate) or revised
                       # (a hindsight row: its prompt, unless trained after the hindsight prompt)
                       ("rollout_id", pa.string()),
                       ("revision_id", pa.string()),  # hindsight rows: the revision trained; else null
                       ("prompt_id", pa.string()), ("kind", pa.string()),
                       ("is_hindsight", pa.bool_()),
                       ("hindsight_prompt", pa.bool_()),  # trained after the revision's hindsight prompt
                       ("replaced_rollout_id", pa.string()),
                       ("temperature", pa.float64()),  # log-probs are taken at it: the sampling one (train.revision_logprob_temperature)
                       ("reward", pa.float64()), ("shaped_reward", pa.float64()),
                       ("group_mean", pa.float64()), ("group_std", pa.float64()),
                       ("group_size", pa.int32()), ("advantage", pa.float64())]),
            ("iteration", "sample_id"),
        ),
        Table(
            "heldout_answers",
            "one row per (iteration, round, held-out prompt): policy k's answer after that many revision rounds",
            pa.schema([*_ids, *_EVAL_ANSWER]),
            ("iteration", "round", "prompt_id"),
        ),
        Table(
            "heldout_metrics",
            "one row per (iteration, round, metric) of the held-out evaluation of policy k",
            pa.schema([*_ids, *_EVAL_METRIC]),
            ("iteration", "round", "name"),
        ),
        Table(
            "metrics",
            "one row per (iteration, stage, name): a scalar measured by that stage",
            pa.schema([*_ids, ("stage", pa.string()), ("name", pa.string()), ("value", pa.float64())]),
            ("iteration", "stage", "name"),
            per_stage=True,
        ),
    ]
}


# Outputs of `herl grade` and `herl eval` (outside training): not run tables.
GRADE_TABLES: dict[str, Table] = {
    t.name: t
    for t in [
        Table(
            "graded_items",
            "one row per (input row, rubric item) of a graded file",
            pa.schema([("input_row", pa.int64()), ("prompt_id", pa.string()), ("item_index", pa.int32()),
                       ("item_id", pa.string()), ("kind", pa.string()), ("weight", pa.float64()),
                       ("verdict_strict", pa.string()), ("verdict_loose", pa.string()),
                       ("grader", pa.string()), ("detail", pa.string())]),
            ("input_row", "item_index"),
        ),
        Table(
            "graded_rows",
            "one row per input row of a graded file: rewards, strict and loose",
            pa.schema([("input_row", pa.int64()), ("prompt_id", pa.string()), ("items_total", pa.int32()),
                       ("items_met_strict", pa.int32()), ("items_met_loose", pa.int32()),
                       ("items_unknown", pa.int32()), ("reward_strict", pa.float64()),
                       ("reward_loose", pa.float64()), ("all_met_strict", pa.bool_()), ("all_met_loose", pa.bool_())]),
            ("input_row",),
        ),
        Table(
            "eval_answers",
            "one row per (round, prompt) of `herl eval`: the current answer and its grades",
            pa.schema(_EVAL_ANSWER),
            ("round", "prompt_id"),
        ),
        Table(
            "eval_metrics",
            "one row per (round, metric) of `herl eval`",
            pa.schema(_EVAL_METRIC),
            ("round", "name"),
        ),
    ]
}
_ALL = {**TABLES, **GRADE_TABLES}


class SchemaError(UserError, ValueError):
    """A table on disk or about to be written does not match its contract."""


# Columns renamed since an earlier herl version: {old name: new name}. Reading a table
# renames them, so a run made before the change resumes and answers `herl sql` as it is.
RENAMED = {"items_total": "items_scored"}  # rewards / hindsight: the items the reward is over


# Columns added since an earlier herl version, and what to say when a run lacks them: its
# tables still answer `herl sql` (the column reads as null), but stages cannot use them.
ADDED = {"temperature": "rows carry the temperature they were sampled at",
         "looped": "answers record whether they loop, for the repetition rule"}


def _migrate(table: pa.Table, spec: Table) -> pa.Table:
    if spec.name == "batch" and "source_id" in table.column_names:
        # batch ids before they were named for what they point to: rollout_ref is the rollout
        # (rollout_id); source_id is the revision for hindsight rows (revision_id), else the
        # rollout again
        hindsight = table.column("is_hindsight")
        revision = pc.if_else(hindsight, table.column("source_id"), pa.scalar(None, pa.string()))
        table = table.drop_columns(["source_id"]).append_column("revision_id", revision)
        table = table.rename_columns(["rollout_id" if n == "rollout_ref" else n for n in table.column_names])
    names = [RENAMED[n] if n in RENAMED and spec.schema.get_field_index(RENAMED[n]) >= 0
             and n not in spec.schema.names else n for n in table.column_names]
    return table.rename_columns(names) if names != table.column_names else table


def needs_migration(name: str, path: Path) -> bool:
    """Whether the Parquet file at `path` still has a renamed column of table `name`."""
    schema = pq.read_schema(path)  # the footer, read once
    return _migrate(schema.empty_table(), _ALL[name]).column_names != schema.names


def _check(table: pa.Table, spec: Table, where: str) -> pa.Table:
    table = _migrate(table, spec)
    expected = spec.schema
    missing = [f.name for f in expected if f.name not in table.column_names]
    extra = [n for n in table.column_names if expected.get_field_index(n) < 0]
    if missing and not extra and set(missing) <= set(ADDED):
        raise SchemaError(f"{where}: table '{spec.name}' has no field(s) {missing}: it was written by an earlier "
                          f"herl version (now {'; '.join(ADDED[m] for m in missing)}); `herl sql` still reads it, "
                          "but a run continues only from stages written by this version: start a new run")
    if missing or extra:
        raise SchemaError(f"{where}: table '{spec.name}' has missing fields {missing} and unexpected fields {extra}")
    table = table.select(expected.names)
    for field in expected:
        got = table.schema.field(field.name).type
        if got != field.type:
            try:
                col = table.column(field.name).cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise SchemaError(f"{where}: field '{spec.name}.{field.name}' has type {got}, expected {field.type}: {exc}") from exc
            table = table.set_column(expected.get_field_index(field.name), field.name, col)
    return table.cast(expected)


def from_rows(name: str, rows: list[dict]) -> pa.Table:
    """Build a checked table from row dicts (field names must match the contract)."""
    spec = _ALL[name]
    for i, row in enumerate(rows):
        missing = [f for f in spec.schema.names if f not in row]
        if missing:
            raise SchemaError(f"table '{name}' row {i}: missing fields {missing}")
    try:
        return pa.Table.from_pylist(rows, schema=spec.schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaError(f"table '{name}': {exc}") from exc


def _disk_error(exc: BaseException, path: Path) -> DiskError | None:
    """The DiskError naming `path` for a write that failed for want of room or permission
    (pyarrow's write errors carry no errno: a disk left full says it); None otherwise."""
    if isinstance(exc, DiskError):
        return None  # already says which file
    err = disk_error(exc, path)
    if err is None and isinstance(exc, (OSError, pa.ArrowException)) and out_of_space(path):
        err = no_space(path)
    return err


# ---- digests ------------------------------------------------------------------------
# sha256 of the files this process knows, keyed by what changes whenever a file is
# rewritten: (device, inode, size, mtime, ctime). ctime cannot be set back by a user, so a
# file whose key is unchanged holds the bytes that were hashed. Filled by hashing, by
# atomic_write (which hashes what it writes as it writes it) and by `remember_digest`
# (digests another process recorded with the file's stat, in a manifest).
_digests: dict[tuple[int, int, int, int, int], str] = {}


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_sha256(path: Path) -> str:
    """The sha256 of a file; hashed at most once per process while the file is unchanged."""
    key = _stat_key(path.stat())
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


def _recorded_stat(st: os.stat_result) -> list[int]:
    """What a digest record stores of a file's stat (the device may differ across boots)."""
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def digest_record(path: Path) -> dict:
    """{sha256, stat} of a file, to store beside it (a manifest, a snapshot's metadata):
    another process hands it to `remember_digest` instead of reading the file again."""
    return {"sha256": file_sha256(path), "stat": _recorded_stat(path.stat())}


def remember_digest(path: Path, record: dict) -> None:
    """Trust a `digest_record` for `path` when the file's inode, size, mtime and ctime are
    still the recorded ones (a rewritten, touched or copied file has another ctime or
    inode, and is hashed again)."""
    try:
        st = path.stat()
        stat, digest = record["stat"], record["sha256"]
    except (OSError, KeyError, TypeError):
        return
    if isinstance(digest, str) and stat == _recorded_stat(st):
        _digests[_stat_key(st)] = digest


class _HashingFile:
    """A binary file that hashes what is written through it (pyarrow writes through it)."""

    def __init__(self, fh):
        self.fh, self.sha, self.written = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.written += len(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.written

    def flush(self) -> None:
        self.fh.flush()

    def fileno(self) -> int:
        return self.fh.fileno()

    @property
    def closed(self) -> bool:
        return self.fh.closed

    def close(self) -> None:  # the with-block of atomic_write closes the real file
        pass


class OutputPathError(UserError, ValueError):
    """An output path herl must not write: something other than a regular file or folder is
    there, or no file can be made beside it."""


def refuse_special(path: Path, folder: bool = False) -> None:
    """Outputs go to new paths or replace what herl writes: a regular file (`folder`: a
    folder). A rename over a device, FIFO, socket, link or the other kind would replace it
    (as root, /dev/full with a plain file), so it is refused, naming what is there."""
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputPathError(f"cannot write {path}: {exc.strerror}") from None
    if (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)):
        return
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISREG, "a file")]
    what = next((name for test, name in kinds if test(mode)), "not a regular file")
    want = "a folder" if folder else "a file"
    raise OutputPathError(f"cannot write {path}: it is {what}, and herl writes {want} there only to a new path or "
                          f"over {want} it wrote; choose another path")


def _temporary_beside(path: Path, make):
    """`make(prefix, dir)` (mkstemp or mkdtemp) beside `path`, its folder made first; a
    failure is one line naming `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        made = make(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        err = disk_error(exc, path)
        if err is not None:
            raise err from None
        raise OutputPathError(f"cannot write {path}: {exc.strerror or exc} (in {path.parent})") from None
    return made


@contextmanager
def atomic_write(path: Path, mode: str = "wb"):
    """Open a temporary file beside `path`; on success fsync it and rename it to `path`.

    Readers see the old file or the complete new one, never a partial one; on error
    (or a kill) only a `.<name>.*.tmp` file remains, which the next attempt removes.
    A binary file is hashed as it is written: its digest costs no second read. Only a new
    path or a regular file is replaced (refuse_special)."""
    path = Path(path)
    refuse_special(path)
    fd, tmp = _temporary_beside(path, lambda prefix, dir: tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=dir))
    try:
        with os.fdopen(fd, mode) as raw:
            fh = _HashingFile(raw) if mode == "wb" else raw
            yield fh
            fh.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        if isinstance(fh, _HashingFile):
            _digests[_stat_key(path.stat())] = fh.sha.hexdigest()
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        # a full or read-only disk, said with the file meant (not the temporary one)
        err = _disk_error(exc, path)
        if err is not None:
            raise err from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_files(folder: Path) -> None:
    """Give every file under `folder` the permissions a plain write would (0666 less the
    umask): temporary files are made 0600, which a model one shares must not keep."""
    mode = 0o666 & ~_umask()
    for f in Path(folder).rglob("*"):
        if f.is_file():
            os.chmod(f, mode)


@contextmanager
def atomic_directory(dest: Path):
    """Yield a new, empty temporary folder beside `dest`; when the with-block succeeds the
    folder replaces `dest` (one rename), on any error it is removed. A kill midway leaves a
    `.<name>.*` folder, never a half-written `dest`."""
    dest = Path(dest)
    refuse_special(dest, folder=True)
    tmp = Path(_temporary_beside(dest, tempfile.mkdtemp))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # what mkdir would have made (mkdtemp's is 0700)
        if dest.exists():  # an earlier attempt got this far (a killed run, or a stale copy)
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _disk_error(exc, dest)
        if err is not None:
            raise err from None
        raise


def write_table(name: str, table: pa.Table | list[dict], path: Path) -> int:
    """Check `table` against its contract and write it atomically to `path`; returns rows."""
    spec = _ALL[name]
    if isinstance(table, list):
        table = from_rows(name, table)
    table = _check(table, spec, f"writing {path}")
    with atomic_write(path) as fh:
        pq.write_table(table, fh, write_page_checksum=True)  # a page's CRC: a flipped bit fails its read
    return table.num_rows


def read_table(name: str, path: Path) -> pa.Table:
    """Read `path` and check it against table `name`'s contract."""
    if not path.exists():
        raise FileNotFoundError(f"table '{name}' not found at {path}: run the stage that writes it first")
    return _check(pq.read_table(path, page_checksum_verification=True), _ALL[name], f"reading {path}")


def open_dataset(name: str, path: Path):
    """A lazy pyarrow dataset over `path`, checked against table `name`'s contract from the
    file's footer (no rows read): DuckDB then reads only the columns a query uses."""
    import pyarrow.dataset as ds

    if not path.exists():
        raise FileNotFoundError(f"table '{name}' not found at {path}: run the stage that writes it first")
    spec = _ALL[name]
    if needs_migration(name, path):  # an older herl's file: read whole, its columns renamed
        return ds.dataset(read_table(name, path))
    _check(pq.read_schema(path).empty_table(), spec, f"reading {path}")
    return ds.dataset(path, schema=spec.schema, format=parquet_format())


def parquet_format():
    """Parquet as herl reads its tables: each page checked against the CRC written with it
    (files of older herl versions have none, and read as before)."""
    import pyarrow.dataset as ds

    return ds.ParquetFileFormat(
        default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))


class _TableWriter:
    """`write(part)` checks one part against the table's contract and appends it; `rows`
    counts the rows written."""

    def __init__(self, writer: pq.ParquetWriter, spec: Table, path: Path):
        self.writer, self.spec, self.path, self.rows = writer, spec, path, 0

    def __call__(self, part: pa.Table | pa.RecordBatch) -> None:
        table = pa.Table.from_batches([part]) if isinstance(part, pa.RecordBatch) else part
        table = _check(table, self.spec, f"writing {self.path}")
        self.writer.write_table(table)
        self.rows += table.num_rows


@contextmanager
def table_writer(name: str, path: Path) -> Iterator[_TableWriter]:
    """Write table `name` to `path` in parts, each checked against its contract; the file
    appears (atomically) only when the with-block ends without error. Yields a `write(part)`
    function; `write.rows` counts the rows written."""
    spec = _ALL[name]
    with atomic_write(path) as fh:
        writer = pq.ParquetWriter(fh, spec.schema, write_page_checksum=True)
        try:
            yield _TableWriter(writer, spec, path)
        finally:
            writer.close()


def empty(name: str) -> pa.Table:
    return TABLES[name].schema.empty_table()
