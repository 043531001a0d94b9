"""Stage `materialize`: every user's canonical events into the online store (streamed by user in bounded
memory, one atomic switch), plus the service's event log when `data.event_log` is set (docs/online.md)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from uservalue.config import MaterializeParams, Params
from uservalue.data.sources.event_log import event_log_files, event_log_sql
from uservalue.duck import connect, sql_string
from uservalue.errors import InputError
from uservalue.features.online import event_columns
from uservalue.io import write_json
from uservalue.serving.store import OnlineStore, StoreInfo, open_store, store_url

CONTENT = ("user_id", "ts", "behavior", "item_id", "category_id", "quantity", "amount")
ORDER = "user_id, ts, behavior, item_id, category_id, amount"


@dataclass(frozen=True)
class MaterializeResult:
    users: int
    events: int
    logged_new: int  # logged events not yet in the validated events, added with their ids
    appended_after_switch: int
    seconds: float
    store: StoreInfo

    def report(self) -> dict[str, Any]:
        return {"users": self.users, "events": self.events, "logged_new": self.logged_new,
                "appended_after_switch": self.appended_after_switch, "seconds": round(self.seconds, 3),
                "store": self.store.url, "backend": self.store.backend, "generation": self.store.generation,
                "store_bytes": self.store.bytes, "backend_bytes": self.store.backend_bytes,
                "materialized_at": self.store.materialized_at, "format_version": self.store.format_version}


def events_sql(events: Path, log_files: Sequence[Path]) -> str:
    """The events to store, sorted by user, with the event_id of those the service logged."""
    source = f"read_parquet({sql_string(str(events))})"
    columns = ", ".join(CONTENT)
    if not log_files:
        return f"SELECT {columns}, NULL::VARCHAR AS event_id FROM {source} ORDER BY {ORDER}"
    same = " AND ".join(f"v.{c} IS NOT DISTINCT FROM l.{c}" for c in CONTENT)
    # The k-th copy of an event in the validated events pairs with the k-th logged copy.
    copies = f"row_number() OVER (PARTITION BY {columns})"
    return f"""
        WITH logged AS ({event_log_sql(log_files)}),
        logged_users AS (SELECT DISTINCT user_id FROM logged),
        validated AS (SELECT {columns} FROM {source}),
        others AS (SELECT {columns}, NULL::VARCHAR AS event_id FROM validated ANTI JOIN logged_users USING (user_id)),
        v AS (SELECT {columns}, {copies} AS copy FROM validated SEMI JOIN logged_users USING (user_id)),
        l AS (SELECT {columns}, event_id, {copies} AS copy FROM logged),
        paired AS (
            SELECT {", ".join(f"coalesce(v.{c}, l.{c}) AS {c}" for c in CONTENT)}, l.event_id,
                   v.user_id IS NULL AS logged_new
            FROM v FULL OUTER JOIN l ON {same} AND v.copy = l.copy
        )
        SELECT *, false AS logged_new FROM others
        UNION ALL
        SELECT * FROM paired
        ORDER BY {ORDER}
    """


def user_batches(reader: pa.RecordBatchReader, batch_events: int) -> Iterator[pa.Table]:
    """Tables of whole users from a stream sorted by user: cut before the last user of each batch."""
    pending: list[pa.Table] = []
    rows = 0
    for batch in reader:
        pending.append(pa.Table.from_batches([batch]))
        rows += batch.num_rows
        if rows < batch_events:
            continue
        table = pa.concat_tables(pending)
        users = table.column("user_id")
        cut = pc.index(users, users[-1]).as_py()  # the first row of the last user
        if cut > 0:
            yield table.slice(0, cut)
            table = table.slice(cut)
        pending, rows = [table], table.num_rows
    if rows:
        yield pa.concat_tables(pending)


def materialize(events: Path, store: OnlineStore, params: MaterializeParams, event_log: str | Path | None = None,
                progress: Callable[[int, int], None] | None = None) -> MaterializeResult:
    """Replace the store's state with every user's events (plus the event log's); see the module."""
    if not events.is_file():
        raise InputError(events, "file does not exist", expected="the output of `uservalue validate`")
    start = time.perf_counter()
    log_files = event_log_files(event_log)
    con = connect(memory_limit=params.memory_limit, threads=params.threads)
    hashing = con.cursor()  # the main connection is busy streaming
    try:
        reader = con.sql(events_sql(events, log_files)).to_arrow_reader(min(params.batch_events, 100_000))
        logged_new = 0
        with store.materialize() as job:
            for table in user_batches(reader, params.batch_events):
                if "logged_new" in table.column_names:
                    logged_new += pc.sum(table.column("logged_new")).as_py() or 0
                ids = table.column("event_id")
                job.write_users(event_columns(table, con=hashing),
                                ids.to_numpy(zero_copy_only=False) if ids.null_count < len(ids) else None)
                if progress is not None:
                    progress(job.users, job.events)
        late = [f for f in event_log_files(event_log) if f not in set(log_files)]
        appended = _append_logged(store, late, hashing) if late else 0
    finally:
        hashing.close()
        con.close()
    return MaterializeResult(job.users, job.events, logged_new, appended, time.perf_counter() - start, store.info())


def _append_logged(store: OnlineStore, files: list[Path], con: Any) -> int:
    table = con.sql(event_log_sql(files)).to_arrow_table()
    return store.append(event_columns(table, con=con), table.column("event_id").to_pylist())


def run_materialize(root: Path, params: Params, events: Path, report: Path, url: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> MaterializeResult:
    """The stage: params `materialize`, `serve.store`, `data.event_log` (relative paths are the project
    `root`'s); writes `report` (JSON). It needs no MLflow, so it takes the root, not a StageContext."""
    store, event_log = params.serve.store, params.data.event_log
    with open_store(store_url(store.url, url), root=root, namespace=store.namespace) as opened:
        result = materialize(root / events, opened, params.materialize, root / event_log if event_log else None,
                             progress)
    write_json(root / report, result.report())
    return result
