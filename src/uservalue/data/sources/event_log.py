"""The event log: events the service accepted (`/events`), as Parquet files
`<dir>/date=YYYY-MM-DD/part-*.parquet` in the canonical schema plus `event_id`. Ingest appends them to
the source's events; a (user, event_id) counts once, an event without an id always counts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa

from uservalue.duck import connect, sql_string
from uservalue.schema import EVENT_COLUMNS, EVENTS_SCHEMA

EVENT_LOG_SCHEMA = EVENTS_SCHEMA.append(pa.field("event_id", pa.string()))
EVENT_LOG_PATTERN = "date=*/part-*.parquet"  # written atomically: a temporary file starts with a dot


def event_log_files(directory: str | Path | None) -> list[Path]:
    """The log's files, oldest day first (none when the log is not configured or not there yet)."""
    if directory is None or not Path(directory).is_dir():
        return []
    return sorted(Path(directory).glob(EVENT_LOG_PATTERN))


def event_log_sql(files: Sequence[Path]) -> str:
    """The logged events (canonical columns and event_id), each (user_id, event_id) once: the first
    logged (by file, then row) wins."""
    listed = ", ".join(sql_string(str(f)) for f in files)
    columns = ", ".join(EVENT_LOG_SCHEMA.names)
    return f"""
        SELECT {columns} FROM (
            SELECT {columns}, filename, file_row_number
            FROM read_parquet([{listed}], filename = true, file_row_number = true, hive_partitioning = false)
        )
        QUALIFY event_id IS NULL
             OR row_number() OVER (PARTITION BY user_id, event_id ORDER BY filename, file_row_number) = 1
    """


def read_event_log(directory: str | Path | None, *, batch_rows: int = 1_000_000,
                   memory_limit: str = "2GB") -> Iterator[pa.Table]:
    """The logged events as canonical batches (event_id dropped), de-duplicated as event_log_sql says."""
    files = event_log_files(directory)
    if not files:
        return
    con = connect(memory_limit=memory_limit)
    try:
        columns = ", ".join(EVENT_COLUMNS)
        reader = con.sql(f"SELECT {columns} FROM ({event_log_sql(files)})").to_arrow_reader(batch_rows)
        for batch in reader:
            yield pa.Table.from_batches([batch]).cast(EVENTS_SCHEMA)
    finally:
        con.close()
