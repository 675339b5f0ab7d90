"""Read-only SQL over a run's tables (`herl sql`, the tests, the benchmarks).

    rel = query_run("runs/R", "SELECT iteration, avg(reward) FROM rewards GROUP BY 1")

Two locks, either of which alone stops a write:
1. The query is parsed by DuckDB and accepted only when it is one plain SELECT whose
   syntax tree holds nothing but query nodes (no EXPLAIN ANALYZE, no COPY inside a CTE,
   no PRAGMA, SET, ATTACH, INSERT...).
2. The connection cannot touch the file system at all: each table is handed to DuckDB
   as a pyarrow dataset (pyarrow opens the Parquet files, read only), external access
   is off with no allowed directory, spilling to a temporary folder is off, and the
   configuration is locked so the query cannot turn any of this back on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from herl.runs.rundir import recorded_outputs
from schemas.errors import MissingError, UserError
from schemas.tables import (
    TABLES,
    file_sha256,
    needs_migration,
    parquet_format,
    read_table,
    remember_digest,
)


class ReadOnlyQueryError(UserError, ValueError):
    """`herl sql` accepts one plain SELECT statement only."""


# Query-node types a read-only SELECT is made of (DuckDB's json_serialize_sql names).
# Anything else ending in _NODE (COPY_QUERY_NODE, INSERT/UPDATE/DELETE nodes of newer
# DuckDB versions) is a statement hidden inside the query and is refused.
_QUERY_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}


def _objects(tree) -> Iterator[dict]:
    """Every JSON object of a serialized syntax tree, at any depth."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _node_types(tree) -> set[str]:
    found: set[str] = set()
    for node in _objects(tree):
        t = node.get("type")
        if isinstance(t, str) and t.endswith("_NODE"):
            found.add(t)
        if "info_type" in node:  # a statement's info block (COPY_INFO, ...) never belongs in a SELECT
            found.add(str(node["info_type"]))
    return found


def check_select(sql: str) -> set[str]:
    """Raise ReadOnlyQueryError unless `sql` is exactly one plain SELECT; returns the names
    of the tables it reads."""
    import duckdb

    con = duckdb.connect()
    try:
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as exc:
            raise ReadOnlyQueryError(str(exc)) from None
        if len(statements) != 1:
            raise ReadOnlyQueryError(f"one SELECT statement at a time; got {len(statements)} statements")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            raise ReadOnlyQueryError(f"only plain SELECT statements are allowed; got {kind.name}")
        (serialized,) = con.execute("SELECT json_serialize_sql($q::VARCHAR)", {"q": sql}).fetchone() or ("{}",)
        tree = json.loads(serialized)
    finally:
        con.close()
    if tree.get("error"):
        raise ReadOnlyQueryError(f"only plain SELECT statements are allowed: {tree.get('error_message', '')}")
    bad = _node_types(tree["statements"]) - _QUERY_NODES
    if bad:
        raise ReadOnlyQueryError(f"only plain SELECT statements are allowed; the query holds {', '.join(sorted(bad))}")
    return _base_tables(tree["statements"])


def _base_tables(tree) -> set[str]:
    return {node["table_name"].lower() for node in _objects(tree)
            if node.get("type") == "BASE_TABLE" and isinstance(node.get("table_name"), str)}


class DamagedTableError(UserError):
    """A table file of the run cannot be read (truncated, overwritten)."""


def _readable(name: str, path: Path) -> str | None:
    """Why the Parquet file of table `name` at `path` cannot be read (None when it can)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowException) as exc:
        first = str(exc).split(". ")[0]
        return " ".join("".join(c if c.isprintable() else " " for c in first).split())  # one printable line
    return None


def _recorded_digests(run_path: Path) -> dict[Path, dict]:
    """{table file: the digest record its stage's manifest holds} for the run's outputs."""
    return recorded_outputs(run_path, run_path.glob("iter-*/_manifests/*.json"))


def _changed(path: Path, record: dict | None) -> str | None:
    """Why `path` is not the file its stage wrote (None: it is, or nothing was recorded).
    A file whose inode, size and times are the recorded ones is taken as written without
    reading it; any other is hashed (a flipped bit changes its times)."""
    if record is None:
        return None
    remember_digest(path, record)
    if file_sha256(path) != record["sha256"]:
        return "it changed since herl wrote it: its sha256 is not the one recorded then"
    return None


def damaged_tables(run_dir: str | Path, recorded: dict[Path, dict] | None = None) -> dict[str, str]:
    """{table: why} for every table of the run with a file that cannot be read, or that is
    not what its stage wrote (its recorded digest, `recorded` if the caller read them):
    a flipped bit is never read as data."""
    run_path = Path(run_dir).resolve()
    recorded = _recorded_digests(run_path) if recorded is None else recorded
    out: dict[str, str] = {}
    for name, spec in TABLES.items():
        pattern = "metrics-*.parquet" if spec.per_stage else spec.filename()
        for p in sorted(run_path.glob(f"iter-*/{pattern}")):
            why = _readable(name, p) or _changed(p, recorded.get(p.resolve()))
            if why and name not in out:
                out[name] = f"table {name}: {p} cannot be read ({why}); run `herl resume {run_path}` to rebuild it " \
                            "(the stage that wrote it is redone)"
    return out


def connect_run(run_dir: str | Path, memory_limit_bytes: int | None = None, omit: frozenset[str] = frozenset(),
                recorded: dict[Path, dict] | None = None):
    """A DuckDB connection with one view per table over all iterations, with no file access.
    Tables in `omit` are not there at all (query_run leaves damaged ones out, so no way of
    naming them, query_table('rewards') included, reads part of one); a damaged file of
    another table (unreadable, or not what its stage wrote) is skipped (the viewer and
    plots show what can be read)."""
    import duckdb
    import pyarrow.dataset as ds

    run_path = Path(run_dir).resolve()
    if not (run_path / "config.json").is_file():
        raise MissingError(f"{run_path} is not a herl run directory (no config.json)")
    con = duckdb.connect(":memory:")
    # no spill folder ($PWD/.tmp by default), no file system, and nothing can be switched back
    con.execute("SET temp_directory = ''")
    con.execute("SET enable_external_access = false")
    if memory_limit_bytes:
        con.execute("SET memory_limit = $limit", {"limit": f"{memory_limit_bytes}B"})
    con.execute("SET lock_configuration = true")
    recorded = _recorded_digests(run_path) if recorded is None else recorded
    for name, spec in TABLES.items():
        if name in omit:
            continue
        pattern = "metrics-*.parquet" if spec.per_stage else spec.filename()
        files = sorted(str(p) for p in run_path.glob(f"iter-*/{pattern}") if p.resolve().is_relative_to(run_path))
        files = [f for f in files if _readable(name, Path(f)) is None and _changed(Path(f), recorded.get(Path(f))) is None]
        # the table's own schema: files of older herl versions missing a column read it as
        # null; ones with a renamed column are read whole, renamed (schemas.tables.RENAMED)
        old = [f for f in files if needs_migration(name, Path(f))]
        parts = [ds.dataset([f for f in files if f not in old], schema=spec.schema, format=parquet_format()),
                 *(ds.dataset(read_table(name, Path(f))) for f in old)]
        con.register(name, ds.dataset(parts) if files else spec.schema.empty_table())
    return con


def query_run(run_dir: str | Path, sql: str, memory_limit_bytes: int | None = None):
    """Run a read-only query over a run; returns the DuckDB relation (executed when fetched).
    A query that reads a damaged table, by any name, is refused with how to repair it."""
    return _open_query(run_dir, sql, memory_limit_bytes)[1]


def _open_query(run_dir: str | Path, sql: str, memory_limit_bytes: int | None):
    """(connection, relation) of a checked read-only query."""
    import duckdb

    tables = check_select(sql)
    recorded = _recorded_digests(Path(run_dir).resolve())  # the manifests, read once for both passes
    damaged = damaged_tables(run_dir, recorded)
    for name in sorted(tables & set(damaged)):
        raise DamagedTableError(damaged[name])
    con = connect_run(run_dir, memory_limit_bytes, omit=frozenset(damaged), recorded=recorded)
    try:
        return con, con.sql(sql)
    except duckdb.CatalogException as exc:  # query_table('rewards'), query('... rewards'): bound here
        for name, why in damaged.items():
            if name in str(exc).lower():  # as DuckDB matches names: query_table('REWARDS') too
                raise DamagedTableError(why) from None
        raise


class QueryStopped(UserError):
    """A query was stopped: Ctrl-C, its time limit or its memory limit."""


def run_query(run_dir: str | Path, sql: str, timeout_s: float | None = None,
              memory_limit_bytes: int | None = None, max_rows: int | None = None):
    """Execute a read-only query to an Arrow table (at most `max_rows` rows), bounded as
    stream_query says."""
    import pyarrow as pa

    batches: list = []
    schema = stream_query(run_dir, sql, batches.append, timeout_s, memory_limit_bytes, max_rows)
    return pa.Table.from_batches(batches, schema=schema)


def stream_query(run_dir: str | Path, sql: str, on_batch, timeout_s: float | None = None,
                 memory_limit_bytes: int | None = None, max_rows: int | None = None):
    """Execute a read-only query and hand its result to `on_batch` one Arrow record batch
    at a time (at most `max_rows` rows in all; None: every row); returns its schema.
    Bounded: stopped at once by Ctrl-C, after `timeout_s` seconds (None or 0: no limit),
    the time `on_batch` takes (printing) included, or when the query needs more than
    `memory_limit_bytes` (nothing spills to disk); QueryStopped says which. The result
    streams: a batch is handed on and dropped, so printing 30M rows holds a batch at a time.

    The query runs in a child process of its own session, which is killed to stop it:
    DuckDB's interrupt cannot reach a connection busy in another thread, and a query
    blocked in C++ never sees Python's KeyboardInterrupt. It writes Arrow's stream format
    into a pipe that a thread here reads; the child ends with this process whatever ends
    it, and keeps the time limit itself too."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import threading
    import time

    import pyarrow as pa

    try:
        check_select(sql)  # refused here, at once, before a process starts
    except KeyboardInterrupt:
        raise QueryStopped("the query was stopped by Ctrl-C") from None
    # damaged tables are found once, by the child's query_run, and come back as "damaged"
    with tempfile.TemporaryDirectory(prefix="herl-sql-") as tmp:
        error = Path(tmp) / "error.json"
        job = json.dumps({"run_dir": str(run_dir), "sql": sql, "memory": memory_limit_bytes, "error": str(error),
                          "parent": os.getpid(), "timeout": timeout_s or None, "max_rows": max_rows})
        # Ctrl-C is held back while the child starts: landing inside Popen, it would leave a
        # query running (in its own session, ignoring SIGINT) that nothing here can kill
        held: list[int] = []
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum)) if main else None
        try:
            proc = subprocess.Popen([sys.executable, "-m", "herl.runs.query", job], start_new_session=True,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        read: dict = {}

        def reader() -> None:  # the pipe, batch by batch, into on_batch (printing happens here)
            try:
                stream = pa.ipc.open_stream(proc.stdout)
                read["schema"] = stream.schema
                for batch in stream:
                    on_batch(batch)
            except BaseException as exc:  # noqa: BLE001 (a closed pipe, a failing printer: reported below)
                read["error"] = exc

        thread = threading.Thread(target=reader, name="herl-sql-result", daemon=True)
        thread.start()
        t0, stopped = time.monotonic(), None

        def over_time() -> bool:
            return bool(timeout_s) and time.monotonic() - t0 > (timeout_s or 0)

        try:
            if held:  # the Ctrl-C held back lands here, where the query can be killed
                raise KeyboardInterrupt
            while thread.is_alive():  # the result streams until the child closes the pipe
                thread.join(0.05)
                if over_time():
                    break
            # the stream ended: the child exits now (a reader that failed, say a closed
            # pipe downstream, leaves it blocked on a full pipe: it is killed below)
            while "error" not in read and proc.poll() is None and not over_time():
                time.sleep(0.02)
            if over_time() and (thread.is_alive() or proc.poll() is None):
                stopped = f"stopped after {timeout_s:g} s, its time limit (raise it with --timeout SECONDS; 0: none)"
        except KeyboardInterrupt:
            stopped = "stopped by Ctrl-C"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            thread.join(5)
            if proc.stdout is not None:
                proc.stdout.close()
        if stopped is not None:
            raise QueryStopped(f"the query was {stopped}")
        if error.exists():
            err = json.loads(error.read_text())
            if err["kind"] == "memory":
                limit = f"{memory_limit_bytes / 2**30:.2f} GiB" if memory_limit_bytes else "DuckDB's default"
                raise QueryStopped(f"the query needs more memory than its limit of {limit} (raise it with "
                                   f"--memory-limit GB): {err['message']}")
            raise (DamagedTableError if err["kind"] == "damaged" else QueryError)(err["message"])
        if isinstance(read.get("error"), (BrokenPipeError, KeyboardInterrupt)):
            raise read["error"]  # the reader of our output left, or Ctrl-C landed in the printer
        if proc.returncode != 0 or "schema" not in read or "error" in read:
            why = f": {read['error']}" if "error" in read else ""
            raise QueryError(f"the query's process ended with exit code {proc.returncode} and no result{why}")
        return read["schema"]


class QueryError(UserError):
    """DuckDB refused or failed the query (its message says why)."""


def _query_job(job: dict) -> int:
    """The child process of stream_query: run the query and write its result to stdout in
    Arrow's stream format, a batch at a time, or the error to job["error"]."""
    import json
    import os
    import signal
    import sys

    import duckdb
    import pyarrow as pa

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it kills this process to stop it
    # whatever ends the parent (SIGHUP, SIGTERM, SIGKILL: no handler of its runs) ends this
    # query too; a parent already gone before that was set is caught by the pid check
    from herl.util.procs import die_with_parent

    die_with_parent(signal.SIGKILL)
    if os.getppid() != job["parent"]:
        return 4
    if job.get("timeout"):  # the time limit holds here too, should the parent be stopped (SIGSTOP):
        # SIGALRM's default action ends the process in the kernel, with no Python (DuckDB may hold the GIL)
        import math

        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(math.ceil(float(job["timeout"])) + 1)
    out = sys.stdout.buffer
    try:
        rel = query_run(job["run_dir"], job["sql"], job["memory"])
        if job.get("max_rows") is not None:
            rel = rel.limit(int(job["max_rows"]))
        # the name differs across DuckDB versions (fetch_record_batch is deprecated in 2.x)
        reader = rel.to_arrow_reader(8192) if hasattr(rel, "to_arrow_reader") else rel.fetch_record_batch(8192)
        with pa.ipc.new_stream(out, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
        out.flush()
        return 0
    except BrokenPipeError:  # the parent stopped reading (it was stopped, or its reader left)
        return 0
    except DamagedTableError as exc:
        kind, message = "damaged", str(exc)
    except duckdb.OutOfMemoryException as exc:
        kind, message = "memory", str(exc).splitlines()[0]
    except (duckdb.Error, pa.ArrowException, UserError, OSError) as exc:
        kind, message = "error", str(exc)
    with open(job["error"], "w") as fh:
        json.dump({"kind": kind, "message": message}, fh)
    return 3


def default_memory_limit() -> int:
    """herl sql's memory bound: a quarter of this machine's memory (DuckDB's own default,
    80%, let one cross join starve everything else)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError):
        return 4 << 30


if __name__ == "__main__":
    import json as _json
    import sys as _sys

    raise SystemExit(_query_job(_json.loads(_sys.argv[1])))
