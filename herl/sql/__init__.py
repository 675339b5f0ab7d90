"""The SQL models of the loop (the .sql files beside this module), run in DuckDB over
Arrow tables or pyarrow datasets with bound parameters.

- originals.sql  table macro originals(skip_looping): one row per rollout with its grade
- groups.sql     table macro failed_groups(threshold, skip_looping): one row per failed group
- candidates.sql hindsight candidates (the hindsight stage)
- advantages.sql the training batch's advantages (the advantages stage)
- sequences.sql  the batch joined to its token lists (the train job)
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

SQL_DIR = Path(__file__).resolve().parent

# what an empty revision consists of: the characters Python's str.strip() removes (every
# str.isspace() character, Unicode ones included), as the reference strips its decoded
# revisions. Bound into advantages.sql as $whitespace (RE2's \s is ASCII only).
WHITESPACE = "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


def is_blank(text: str) -> bool:
    """Nothing but WHITESPACE: the one definition of an empty revision."""
    return not text.strip(WHITESPACE)

# models other models select from, created first, like dbt's ref(): views {model: views
# it needs} and table macros {model: [(macro, its file, its parameters)]}
VIEWS: dict[str, list[str]] = {}
_CHOICE_MACROS = [("originals", "originals", ["skip_looping"]),
                  ("failed_groups", "groups", ["threshold", "skip_looping"])]
MACROS = {"candidates": _CHOICE_MACROS, "advantages": _CHOICE_MACROS}


def run_sql_file(name: str, tables: dict, params: dict) -> pa.Table:
    """Execute <name>.sql with `tables` visible by name and `params` bound ($name).

    Shared models (VIEWS, MACROS) are created over `tables` first."""
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
        for macro, model, args in MACROS.get(name, []):  # names of ours, as above
            con.execute(f"CREATE MACRO {macro}({', '.join(args)}) AS TABLE " + (SQL_DIR / f"{model}.sql").read_text())
        rel = con.sql(query, params=params)
        # the method's name differs across DuckDB versions
        yield rel.to_arrow_reader(batch_rows) if hasattr(rel, "to_arrow_reader") else rel.fetch_arrow_reader(batch_rows)
    finally:
        con.close()


def to_arrow(rel) -> pa.Table:
    """Execute a DuckDB relation into an Arrow table (the method's name differs across DuckDB versions)."""
    return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
