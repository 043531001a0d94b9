"""The ingest stage on Spark (params `data.engine: spark`): the same canonical events Parquet, the same
rejects file and the same errors as uservalue.data.sources with DuckDB, for the CDNOW, Taobao and file
(CSV / Parquet) sources; the synthetic source is generated in-process on either engine.

Spark reads the raw file in parallel; each partition's Arrow batches go through the very mapping of the
DuckDB path (uservalue.data.sources.tabular.RawBatch: column specs, behaviours, numbers, timestamps,
returns, ids, guests dropped), so the definition exists once. Rows carry Spark's
monotonically_increasing_id; only when a row fails or is set aside is it turned into the file's row
number (one count per partition, on that path only). The mapped rows go to a scratch Parquet, are
sorted by (user_id, ts, behavior, item_id NULLS FIRST) as DuckDB sorts them, and are copied in order
into the one output file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uservalue.config import DataParams, SparkParams
from uservalue.data.sources import REJECTS_NAME, IngestResult, file_spec, ingest
from uservalue.data.sources.cdnow import COLUMNS as CDNOW_COLUMNS
from uservalue.data.sources.cdnow import SPEC as CDNOW_SPEC
from uservalue.data.sources.cdnow import cdnow_path
from uservalue.data.sources.event_log import EVENT_LOG_SCHEMA, event_log_files
from uservalue.data.sources.tabular import (
    RawBatch,
    RejectSink,
    TabularSpec,
    _check_mapped_columns,
    _locate_csv_problem,
    _read_header,
    _reject_rows,
    check_readable,
)
from uservalue.data.sources.taobao import taobao_spec
from uservalue.data.spark_session import (
    copy_parts,
    data_spark_session,
    part_files,
    python_workers,
    spark_scratch,
)
from uservalue.errors import InputError
from uservalue.io import atomic_dir, atomic_path, write_json
from uservalue.schema import EVENT_COLUMNS, EVENTS_SCHEMA, EVENTS_TEXT_SCHEMA, ITEM_TEXT

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

POSITION_BITS = 33  # monotonically_increasing_id = partition index << 33 | row index in the partition
EVENT, REJECT, ERROR = "event", "reject", "error"
SORT_KEY = ("user_id", "ts", "behavior", "item_id")  # uservalue.data.sources.writer.sort_events_file


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _out_schema(text: bool, raw: int) -> pa.Schema:
    """What the mapping emits per row: the canonical columns, then its kind, its position (rejects,
    errors), an error (JSON) and the raw line's columns as text (rejects)."""
    schema = EVENTS_TEXT_SCHEMA if text else EVENTS_SCHEMA
    extra = [pa.field("__kind", pa.string()), pa.field("__pos", pa.int64()), pa.field("__error", pa.string())]
    extra += [pa.field(f"__raw{i}", pa.string()) for i in range(raw)]
    return pa.schema(list(schema) + extra)


def _spark_schema(schema: pa.Schema) -> str:
    kinds = {pa.string(): "string", pa.float64(): "double", pa.int64(): "bigint"}
    return ", ".join(f"`{f.name}` {'timestamp' if pa.types.is_timestamp(f.type) else kinds[f.type]}"
                     for f in schema)


def _rows(schema: pa.Schema, n: int, values: dict[str, Any]) -> pa.RecordBatch:
    arrays = [values[f.name] if f.name in values else pa.nulls(n, f.type) for f in schema]
    return pa.Table.from_arrays([pa.array(a, f.type) if not isinstance(a, (pa.Array, pa.ChunkedArray)) else a
                                 for a, f in zip(arrays, schema, strict=True)], schema=schema)


def _error_row(schema: pa.Schema, error: InputError) -> pa.Table:
    found = error.found if isinstance(error.found, (str, int, float, type(None))) else repr(error.found)
    payload = json.dumps({"problem": error.problem, "row": error.row, "column": error.column,
                          "expected": error.expected, "found": found})
    return _rows(schema, 1, {"__kind": [ERROR], "__pos": [error.row], "__error": [payload]})


def _mapped(batch: RawBatch, schema: pa.Schema, raw_names: list[str]) -> Iterator[pa.Table]:
    """One raw batch as the DuckDB path maps it: rejects (with their positions), then the events."""
    kept, rejected = batch.split_missing_users()
    if rejected is not None:
        values = {"__kind": [REJECT] * rejected.num_rows, "__pos": rejected.column("row"),
                  "__error": rejected.column("reason")}
        values |= {f"__raw{i}": rejected.column(name) for i, name in enumerate(raw_names)}
        yield _rows(schema, rejected.num_rows, values)
    if kept.table.num_rows:
        events = kept.canonical()
        values = {name: events.column(name) for name in events.column_names}
        yield _rows(schema, events.num_rows, values | {"__kind": [EVENT] * events.num_rows})


def _tabular_mapper(path: str, spec: TabularSpec, names: list[str], schema: pa.Schema):
    """The function mapInArrow runs per partition: raw string/typed columns plus `__pos` in, mapped out."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for record_batch in batches:
            table = pa.Table.from_batches([record_batch])
            if not table.num_rows:
                continue
            positions = table.column("__pos").to_numpy()
            raw = RawBatch(table.select(names), Path(path), 0, spec, rows=positions)
            try:
                for out in _mapped(raw, schema, names):
                    yield from out.to_batches()
            except InputError as error:
                yield from _error_row(schema, error).to_batches()
                return  # the partition's first error (as the DuckDB path stops at the file's first)

    return run


def _cdnow_mapper(path: str, schema: pa.Schema):
    """read_cdnow's parsing, per partition of the file's lines: whitespace-split ASCII fields, the first
    non-blank line of the file is the header, a line of another width is an error naming it."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        header_seen = None
        for record_batch in batches:
            if not record_batch.num_rows:
                continue
            lines = record_batch.column(0).to_pylist()
            positions = record_batch.column(1).to_numpy()
            if header_seen is None:  # only partition 0 holds the header
                header_seen = int(positions[0]) >> POSITION_BITS != 0
            values, kept = [], []
            for line, position in zip(lines, positions, strict=True):
                fields = [cell.decode("utf-8") for cell in (line or "").encode("utf-8").split()]
                if not fields:
                    continue
                if not header_seen:
                    header_seen = True
                    continue
                if len(fields) != len(CDNOW_COLUMNS):
                    error = InputError(
                        path, f"{len(fields)} whitespace-separated field(s)", row=int(position),
                        column=CDNOW_COLUMNS[len(fields)] if len(fields) < len(CDNOW_COLUMNS) else None,
                        expected=f"{len(CDNOW_COLUMNS)} fields ({' '.join(CDNOW_COLUMNS)})", found=" ".join(fields))
                    yield from _error_row(schema, error).to_batches()
                    return
                values.append(fields)
                kept.append(position)
            if not values:
                continue
            columns = {name: pa.array([row[i] for row in values], pa.string())
                       for i, name in enumerate(CDNOW_COLUMNS)}
            columns["behavior"] = pa.array(["buy"] * len(values), pa.string())
            raw = RawBatch(pa.table(columns), Path(path), 0, CDNOW_SPEC, rows=np.array(kept, np.int64))
            try:
                for out in _mapped(raw, schema, []):
                    yield from out.to_batches()
            except InputError as error:
                yield from _error_row(schema, error).to_batches()
                return

    return run


class _Raw:
    """A raw Spark read with its positions, and how a position becomes the file's row number."""

    def __init__(self, frame: DataFrame, path: str, first_row: int) -> None:
        from pyspark.sql import functions as F

        self.frame = frame.withColumn("__pos", F.monotonically_increasing_id())
        self.source, self.path, self.first_row = frame, path, first_row
        self._offsets: dict[int, int] | None = None

    def row_of(self, position: int) -> int:
        """The file's row number of a position (counts rows per partition once, on first use)."""
        if self._offsets is None:
            from pyspark.sql import functions as F

            counts = dict(self.source.groupBy(F.spark_partition_id().alias("p")).count().collect())
            self._offsets, total = {}, 0
            for partition in sorted(counts):
                self._offsets[partition] = total
                total += counts[partition]
        partition, index = position >> POSITION_BITS, position & ((1 << POSITION_BITS) - 1)
        return self.first_row + self._offsets.get(partition, 0) + index


def _read_tabular(spark: SparkSession, path: str, spec: TabularSpec, fmt: str) -> tuple[_Raw, list[str], bool]:
    """The file's mapped columns as Spark reads them (CSV: all text, as the Arrow reader reads them)."""
    parquet = fmt == "parquet"
    if fmt == "auto":
        if not _is_local(path):
            parquet = path.endswith(".parquet")
        else:
            from uservalue.data.sources.tabular import is_parquet

            parquet = is_parquet(Path(path))
    wanted = spec.read_columns()
    if parquet:
        frame = spark.read.parquet(path)
        _check_mapped_columns(Path(path), spec, frame.columns, row=None)
        return _Raw(frame.select(*[f"`{n}`" for n in wanted]), path, 1), wanted, True
    reader = spark.read.option("sep", spec.delimiter).option("mode", "FAILFAST").option("encoding", "UTF-8")
    if spec.header:
        names = _header(spark, path, spec)
        _check_mapped_columns(Path(path), spec, names, row=1)
    else:
        names = list(spec.headerless_names)
        _check_mapped_columns(Path(path), spec, names, row=None)
    schema = ", ".join(f"`{n}` string" for n in names)
    frame = reader.option("header", spec.header).schema(schema).csv(path)
    return _Raw(frame.select(*[f"`{n}`" for n in wanted]), path, 2 if spec.header else 1), wanted, False


def _header(spark: SparkSession, path: str, spec: TabularSpec) -> list[str]:
    """The CSV's column names: read as the DuckDB path reads them when the file is local."""
    if _is_local(path):
        return _read_header(Path(path), spec)
    return spark.read.option("sep", spec.delimiter).option("header", True).csv(path).columns


def _event_log_frame(spark: SparkSession, directory: str) -> DataFrame:
    """uservalue.data.sources.event_log.event_log_sql in Spark: each (user_id, event_id) once, the first
    logged (by file, then row) winning; events without an id always count."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    files = [str(f) for f in event_log_files(directory)]
    frame = spark.read.schema(_spark_schema(EVENT_LOG_SCHEMA)).parquet(*files).select(
        *EVENT_LOG_SCHEMA.names, F.col("_metadata.file_path").alias("__file"),
        F.col("_metadata.row_index").alias("__index"))
    first = F.row_number().over(Window.partitionBy("user_id", "event_id").orderBy("__file", "__index"))
    frame = frame.withColumn("__first", first)
    return frame.where(F.col("event_id").isNull() | (F.col("__first") == 1)).select(*EVENT_COLUMNS)


def _raise_first_error(errors: list[Any], raw: _Raw) -> None:
    """The file's first failing row, named as the DuckDB path names it."""
    if not errors:
        return
    found = []
    for row in errors:
        detail = json.loads(row["__error"])
        line = raw.row_of(detail["row"]) if detail["row"] is not None else None
        found.append((line if line is not None else -1, detail))
    line, detail = min(found, key=lambda item: item[0])
    raise InputError(raw.path, detail["problem"], row=None if line < 0 else line, column=detail["column"],
                     expected=detail["expected"], found=detail["found"])


def _csv_problem(error: Exception, raw: _Raw, spec: TabularSpec, names: list[str]) -> InputError:
    """Spark could not parse the CSV (FAILFAST): the line scanner of the DuckDB path names the row."""
    located = _locate_csv_problem(Path(raw.path), spec, names) if _is_local(raw.path) else None
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return located or InputError(raw.path, f"cannot be parsed as CSV: {first[:300]}")


def ingest_spark(params: DataParams, out: str | Path, truth_dir: str | Path, rejects_out: str | Path | None = None,
                 spark_params: SparkParams | None = None, spark: SparkSession | None = None) -> IngestResult:
    """uservalue.data.sources.ingest on Spark: the same `out`, `truth_dir` and rejects CSV. Uses `spark`
    when given (tests), else opens the session of `spark_params` and stops it at the end."""
    out, truth_dir = Path(out), Path(truth_dir)
    rejects_out = Path(rejects_out) if rejects_out is not None else out.with_name(REJECTS_NAME)
    if params.source == "synthetic":  # a generator, not a reader: the same in-process code on both engines
        return ingest(params, out, truth_dir, rejects_out)
    own = spark is None
    session = data_spark_session(spark_params or SparkParams(), "uservalue-ingest", "data.engine") if own else spark
    python_workers(session)
    rejects = RejectSink(rejects_out)
    try:
        events = _ingest(session, params, out, rejects)
    except BaseException:
        rejects.discard()
        raise
    finally:
        if own:
            session.stop()
    rejects.close()
    with atomic_dir(truth_dir) as tmp:
        write_json(tmp / "truth.json", {"source": params.source, "planted": False})
    return IngestResult(params.source, events, out, dict(rejects.counts), rejects_out)


def _ingest(spark: SparkSession, params: DataParams, out: Path, rejects: RejectSink) -> int:
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException
    from pyspark.sql import functions as F

    if params.source == "cdnow":
        path = str(check_readable(cdnow_path()))
        raw = _Raw(spark.read.text(path), path, 1)
        spec, names, parquet = CDNOW_SPEC, [], False
        schema = _out_schema(False, 0)
        mapper = _cdnow_mapper(path, schema)
        frame = raw.frame.select("value", "__pos")
    else:
        path = str(params.path)
        if _is_local(path):
            check_readable(path)
        spec = taobao_spec(params) if params.source == "taobao" else file_spec(params)
        fmt = "csv" if params.source == "taobao" else params.file.format
        raw, names, parquet = _read_tabular(spark, path, spec, fmt)
        schema = _out_schema(spec.source(ITEM_TEXT) is not None, len(names))
        mapper = _tabular_mapper(path, spec, names, schema)
        frame = raw.frame
    described = path if params.source != "cdnow" else "cdnow"
    mapped = frame.mapInArrow(mapper, _spark_schema(schema))
    canonical = [f.name for f in (EVENTS_TEXT_SCHEMA if ITEM_TEXT in schema.names else EVENTS_SCHEMA)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with spark_scratch(out.resolve().parent) as scratch:
        try:
            mapped.write.parquet(str(scratch / "mapped"))
        except (Py4JJavaError, PySparkException) as error:
            if params.source == "cdnow" or parquet:
                raise InputError(path, f"cannot be read by Spark: {str(error).strip().splitlines()[0][:300]}") from None
            header = _header(spark, path, spec) if spec.header else list(spec.headerless_names)
            raise _csv_problem(error, raw, spec, header) from None
        written = spark.read.parquet(str(scratch / "mapped"))
        _raise_first_error(written.where(F.col("__kind") == ERROR).select("__error").collect(), raw)
        if params.source != "cdnow":
            _write_rejects(written, raw, names, rejects)
        events_frame = written.where(F.col("__kind") == EVENT).select(*canonical)
        if params.event_log and event_log_files(params.event_log):
            logged = _event_log_frame(spark, params.event_log)
            if ITEM_TEXT in canonical:
                logged = logged.withColumn(ITEM_TEXT, F.lit(None).cast("string"))
            events_frame = events_frame.unionByName(logged)
        ordered = events_frame.orderBy(*[F.col(c).asc_nulls_first() for c in SORT_KEY])
        ordered.write.parquet(str(scratch / "sorted"))
        schema_out = _required_where_full(scratch / "sorted", EVENTS_TEXT_SCHEMA if ITEM_TEXT in canonical
                                          else EVENTS_SCHEMA)
        with atomic_path(out) as tmp:
            events = copy_parts(scratch / "sorted", tmp, schema_out)
            if events == 0:
                raise InputError(described, "contains no events", expected="at least one event row")
    return events


def _required_where_full(folder: Path, schema: pa.Schema) -> pa.Schema:
    """`schema` with the columns that hold no null marked required, as DuckDB's Parquet writer marks them
    (from the part files' statistics: no extra pass over the data)."""
    nulls = {name: 0 for name in schema.names}
    for part in part_files(folder):
        metadata = pq.ParquetFile(part).metadata
        names = metadata.schema.to_arrow_schema().names
        for group in range(metadata.num_row_groups):
            for index, name in enumerate(names):
                statistics = metadata.row_group(group).column(index).statistics
                if name in nulls and (statistics is None or not statistics.has_null_count):
                    nulls[name] = None
                elif name in nulls and nulls[name] is not None:
                    nulls[name] += statistics.null_count
    return pa.schema([f.with_nullable(nulls[f.name] != 0) for f in schema])


def _write_rejects(written: DataFrame, raw: _Raw, names: list[str], rejects: RejectSink) -> None:
    """The lines set aside, in file order, with their row numbers, to the rejects CSV."""
    from pyspark.sql import functions as F

    frame = written.where(F.col("__kind") == REJECT).select("__pos", "__error",
                                                            *[f"__raw{i}" for i in range(len(names))])
    if frame.isEmpty():
        return
    table = frame.orderBy("__pos").toArrow()
    rows = np.array([raw.row_of(int(p)) for p in table.column("__pos").to_pylist()], np.int64)
    columns = pa.table({name: table.column(f"__raw{i}") for i, name in enumerate(names)})
    reasons = table.column("__error").to_pylist()
    for reason in dict.fromkeys(reasons):
        mask = pa.array([r == reason for r in reasons])
        rejects.add(_reject_rows(columns.filter(mask), rows[np.array(mask.to_pylist())], reason))


__all__ = ["ingest_spark"]
