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

from schemas.errors import MissingError, UserError
from schemas.tables import TABLES, needs_migration, read_table


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
        return str(exc).split(". ")[0]
    return None


def connect_run(run_dir: str | Path):
    """A DuckDB connection with one view per table over all iterations, with no file access."""
    import duckdb
    import pyarrow.dataset as ds

    run_path = Path(run_dir).resolve()
    if not (run_path / "config.json").is_file():
        raise MissingError(f"{run_path} is not a herl run directory (no config.json)")
    con = duckdb.connect(":memory:")
    # no spill folder ($PWD/.tmp by default), no file system, and nothing can be switched back
    con.execute("SET temp_directory = ''")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    for name, spec in TABLES.items():
        pattern = "metrics-*.parquet" if spec.per_stage else spec.filename()
        files = sorted(str(p) for p in run_path.glob(f"iter-*/{pattern}") if p.resolve().is_relative_to(run_path))
        # a damaged file is left out here; query_run refuses a query that reads its table
        files = [f for f in files if _readable(name, Path(f)) is None]
        # the table's own schema: files of older herl versions missing a column read it as
        # null; ones with a renamed column are read whole, renamed (schemas.tables.RENAMED)
        old = [f for f in files if needs_migration(name, Path(f))]
        parts = [ds.dataset([f for f in files if f not in old], schema=spec.schema, format="parquet"),
                 *(ds.dataset(read_table(name, Path(f))) for f in old)]
        con.register(name, ds.dataset(parts) if files else spec.schema.empty_table())
    return con


def query_run(run_dir: str | Path, sql: str):
    """Run a read-only query over a run; returns the DuckDB relation (executed when fetched)."""
    tables = check_select(sql)
    run_path = Path(run_dir).resolve()
    for name in sorted(tables & set(TABLES)):
        spec = TABLES[name]
        pattern = "metrics-*.parquet" if spec.per_stage else spec.filename()
        for p in sorted(run_path.glob(f"iter-*/{pattern}")):
            why = _readable(name, p)
            if why:
                raise DamagedTableError(f"table {name}: {p} cannot be read ({why}); run `herl resume {run_path}` "
                                        "to rebuild it (the stage that wrote it is redone)")
    return connect_run(run_dir).sql(sql)
