"""The events the service accepted (`/events`), appended to Parquet by a background thread:
`<dir>/date=YYYY-MM-DD/part-*.parquet` (the day they arrived), the canonical schema plus `event_id`.
Ingest reads it back (params `data.event_log`; uservalue.data.sources.event_log)."""

from __future__ import annotations

import datetime as dt
import os
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from uservalue.data.sources.event_log import EVENT_LOG_SCHEMA
from uservalue.io import atomic_path
from uservalue.serving.prediction_log import PredictionLog

_ARRIVAL = "request_time"  # the column PredictionLog files by day; not written to the event log


class EventLog(PredictionLog):
    """PredictionLog's buffer, flush thread and day rotation, for events: `append` takes a canonical
    events table (pandas or Arrow) with an `event_id` column (null: no id) and returns at once; a file
    is written every `flush_records` events or `flush_seconds`, and on `close()`."""

    def append(self, events: pd.DataFrame | pa.Table, received_at: dt.datetime | None = None) -> None:
        table = events if isinstance(events, pa.Table) else pa.Table.from_pandas(events, preserve_index=False)
        if "event_id" not in table.column_names:
            table = table.append_column("event_id", pa.nulls(table.num_rows, pa.string()))
        frame = table.select(EVENT_LOG_SCHEMA.names).cast(EVENT_LOG_SCHEMA).to_pandas()
        frame[_ARRIVAL] = pd.Timestamp(received_at or dt.datetime.now(dt.UTC))
        super().append(frame)

    def _write(self, day: str, part: pd.DataFrame) -> None:
        table = pa.Table.from_pandas(part.drop(columns=_ARRIVAL), schema=EVENT_LOG_SCHEMA, preserve_index=False)
        stamp = dt.datetime.now(dt.UTC).strftime("%H%M%S%f")
        with atomic_path(self.directory / f"date={day}" / f"part-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
