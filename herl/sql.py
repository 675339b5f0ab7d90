"""Run the stages' .sql files in DuckDB over Arrow tables, with bound parameters."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

SQL_DIR = Path(__file__).resolve().parent.parent / "stages" / "sql"


# models other models select from, created as views first: {model: models it needs}
VIEWS = {"candidates": ["originals"], "advantages": ["originals"]}


def run_sql_file(name: str, tables: dict, params: dict) -> pa.Table:
    """Execute stages/sql/<name>.sql with `tables` visible by name and `params` bound ($name).

    Shared models (VIEWS) are created as views over `tables` first, like dbt's ref()."""
    with sql_file_reader(name, tables, params) as reader:
        return reader.read_all()


@contextmanager
def sql_file_reader(name: str, tables: dict, params: dict, batch_rows: int = 131_072):
    """Like run_sql_file, but yields the result as a stream of record batches, so a large
    result is never whole in memory. `tables` may be Arrow tables or pyarrow datasets
    (read lazily: only the columns the query uses)."""
    query = (SQL_DIR / f"{name}.sql").read_text()
    con = duckdb.connect()
    try:
        for tname, table in tables.items():
            con.register(tname, table)
        for view in VIEWS.get(name, []):
            # the view name is one of ours, never user input; its SQL takes no parameters
            con.execute(f"CREATE VIEW {view} AS " + (SQL_DIR / f"{view}.sql").read_text())
        rel = con.sql(query, params=params)
        # the method's name differs across DuckDB versions
        yield rel.to_arrow_reader(batch_rows) if hasattr(rel, "to_arrow_reader") else rel.fetch_arrow_reader(batch_rows)
    finally:
        con.close()


def to_arrow(rel) -> pa.Table:
    """Execute a DuckDB relation into an Arrow table (the method's name differs across DuckDB versions)."""
    return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
