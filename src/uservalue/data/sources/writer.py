"""Write canonical events: batches to a temporary Parquet, then sort by (user, time) into place.

Parsing streams (each batch is written as it comes), and the sort is DuckDB's, out of core: it holds at
most the `duckdb.memory_limit` of params (uservalue.duck) and spills to `duckdb.temp_directory` beyond,
so ingest's memory does not grow with the log."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from uservalue.duck import connect, sql_string
from uservalue.errors import InputError
from uservalue.io import atomic_path
from uservalue.schema import EVENTS_SCHEMA, EVENTS_TEXT_SCHEMA, ITEM_TEXT, events_schema

ROW_GROUP_ROWS = 1_000_000


def write_sorted_events(
    tables: Iterable[pa.Table], out: str | Path, *, source: str, memory_limit: str | None = None
) -> int:
    """Stream `tables` to disk and write them sorted by user and time to `out` atomically.

    Returns the number of events. Nothing is written to `out` if any batch raises.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Scratch space next to the output (same disk); removed whatever happens.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        unsorted = Path(scratch) / "unsorted.parquet"
        rows = _write_batches(tables, unsorted)
        if rows == 0:
            raise InputError(source, "contains no events", expected="at least one event row")
        with atomic_path(out) as sorted_tmp:
            sort_events_file(unsorted, sorted_tmp, memory_limit=memory_limit)
    return rows


def _write_batches(tables: Iterable[pa.Table], path: Path) -> int:
    """The batches, in order, into one ZSTD Parquet file at `path`, typed by the first batch's schema (so
    item_text is kept when the source has it, issue 23); no file when there is no batch. Returns the rows."""
    rows = 0
    writer: pq.ParquetWriter | None = None
    try:
        for table in tables:
            if writer is None:
                writer = pq.ParquetWriter(path, events_schema(table.schema), compression="zstd")
            writer.write_table(_conform(table, writer.schema), row_group_size=ROW_GROUP_ROWS)
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    return rows


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A batch in the file's schema: an event log's batches (no text) get a null item_text."""
    if schema.equals(EVENTS_TEXT_SCHEMA) and ITEM_TEXT not in table.column_names:
        table = table.append_column(ITEM_TEXT, pa.nulls(table.num_rows, pa.string()))
    return table if table.schema.equals(schema) else table.select(schema.names).cast(schema)


def sort_events_file(src: Path, dst: Path, *, memory_limit: str | None = None) -> None:
    """DuckDB sorts out of core, so this works for logs larger than memory (None: the process-wide limit)."""
    con = connect(memory_limit=memory_limit)
    try:
        con.execute(
            f"""
            COPY (
                SELECT * FROM read_parquet({sql_string(str(src))})
                ORDER BY user_id, ts, behavior, item_id NULLS FIRST
            ) TO {sql_string(str(dst))} (FORMAT PARQUET, COMPRESSION ZSTD, ROW_GROUP_SIZE {ROW_GROUP_ROWS})
            """
        )
    finally:
        con.close()


def write_events_in_order(tables: Iterable[pa.Table], out: str | Path) -> int:
    """For producers that already emit batches sorted by user and time (the generator)."""
    with atomic_path(out) as tmp:
        rows = _write_batches(tables, tmp)
        if not tmp.exists():
            pq.write_table(EVENTS_SCHEMA.empty_table(), tmp, compression="zstd")
    return rows
