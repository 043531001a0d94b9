"""POST /events: validated events into their users' stored state (the next /predict by id sees them) and
into the event log the next ingest reads (params data.event_log)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from uservalue import duck
from uservalue.features.online import event_columns
from uservalue.serving.event_log import EventLog
from uservalue.serving.requests import LoggedEvent, events_table, validate_events
from uservalue.serving.settings import ServeSettings
from uservalue.serving.store import OnlineStore


class EventIntake:
    def __init__(self, store: OnlineStore, settings: ServeSettings, behaviors: Sequence[str]) -> None:
        self.store = store
        self.behaviors = tuple(behaviors)
        self.max_events = settings.max_events
        self.log = EventLog(settings.event_log_dir, settings.log_flush_records, settings.log_flush_seconds)
        # event_columns computes epoch(ts) and the bucket hash (features.buckets) in one DuckDB query;
        # one connection, one caller at a time (the endpoint runs in BentoML's thread pool).
        self._con = duck.connect(memory_limit="256MB", threads=1)
        self._lock = threading.Lock()

    def accept(self, events: Sequence[LoggedEvent]) -> dict[str, Any]:
        """Store and log the events; how many were new (an event_id the user already has counts once)."""
        validate_events(events, self.behaviors, self.max_events, max_users=self.max_events)
        table = events_table([events])
        ids = [e.event_id for e in events]
        with self._lock:
            columns = event_columns(table, con=self._con)
        new = self.store.append(columns, ids)
        self.log.append(table.append_column("event_id", pa.array(ids, pa.string())))
        return {"accepted": len(events), "new": new, "duplicates": len(events) - new}

    def close(self) -> None:
        self.log.close()
        self._con.close()
