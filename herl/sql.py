"""Run the stages' .sql files in DuckDB over Arrow tables, with bound parameters."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

SQL_DIR = Path(__file__).resolve().parent.parent / "stages" / "sql"


def run_sql_file(name: str, tables: dict[str, pa.Table], params: dict) -> pa.Table:
    """Execute stages/sql/<name>.sql with `tables` visible by name and `params` bound ($name)."""
    query = (SQL_DIR / f"{name}.sql").read_text()
    con = duckdb.connect()
    try:
        for tname, table in tables.items():
            con.register(tname, table)
        rel = con.sql(query, params=params)
        return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
    finally:
        con.close()
