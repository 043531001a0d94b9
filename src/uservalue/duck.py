"""One way to open DuckDB, so every stage gets the same limits and a quiet console."""

from __future__ import annotations

from typing import Any

import duckdb


def connect(*, memory_limit: str = "4GB", threads: int = 0) -> duckdb.DuckDBPyConnection:
    config: dict[str, Any] = {"memory_limit": memory_limit, "preserve_insertion_order": True}
    if threads:
        config["threads"] = threads
    con = duckdb.connect(config=config)
    # Progress bars belong to our CLI; DuckDB's own would interleave with them.
    con.execute("SET enable_progress_bar = false")
    return con


def sql_string(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"
