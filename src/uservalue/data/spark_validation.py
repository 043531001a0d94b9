"""The validate stage on Spark (params `validate.engine: spark`): the same expectation suite
(uservalue.data.validation.build_suite) run by Great Expectations' Spark datasource on the events as a
Spark DataFrame, giving the same verdict, failed expectations, quarantined rows (with their reasons),
validated rows and Data Docs as the DuckDB/pandas path.

It follows run_validation (the reference): in quarantine mode the row-level expectations run first with
GE's COMPLETE result, every failing row named by its row in the file (the Parquet row index, given to
GE as `unexpected_index_column_names`), and those rows are moved aside; then the whole suite runs on
the clean rows. GE's Spark results name rows as {"__row": n}; they are rewritten as the row numbers the
pandas path reports, so result.json, summary.json and the Data Docs read alike.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from uservalue.config import SparkParams, ValidateParams
from uservalue.data.spark_session import (
    copy_parts,
    data_spark_session,
    python_workers,
    spark_scratch,
)
from uservalue.data.validation import (
    ExamplesOf,
    StoredRows,
    ValidationOutcome,
    _examples,
    _failure_message,
    _failures,
    _label,
    _no_quarantine,
    _quarantine_share_failure,
    _to_frame,
    _Validator,
    build_suite,
)
from uservalue.errors import InputError, ValidationFailed
from uservalue.io import atomic_dir, atomic_path, write_json
from uservalue.schema import EVENTS_SCHEMA, ITEM_TEXT, events_schema

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

ROW = "__row"  # the row's 0-based index in the events file (Spark's _metadata.row_index)
INDEX_LISTS = ("unexpected_index_list", "partial_unexpected_index_list")


class _SparkValidator(_Validator):
    """The pandas path's ephemeral GE context and Data Docs site, with a Spark dataframe asset."""

    def __init__(self, docs_dir: Path | None) -> None:
        super().__init__(docs_dir)
        self.batch_definition = (
            self.ctx.data_sources.add_spark("spark_events", persist=False)
            .add_dataframe_asset("events")
            .add_batch_definition_whole_dataframe("all")
        )

    def run(self, frame: DataFrame, suite, result_format: dict[str, Any]):
        result = super().run(frame, suite, {**result_format, "unexpected_index_column_names": [ROW]})
        for item in result.results:  # {"__row": n, ...} -> n, as GE reports a pandas frame's index
            details = item.result or {}
            details.pop("unexpected_index_query", None)
            details.pop("unexpected_index_column_names", None)
            for key in INDEX_LISTS:
                if details.get(key) is not None:
                    details[key] = [int(e[ROW]) if isinstance(e, dict) else int(e) for e in details[key]]
            keep = result_format.get("partial_unexpected_count")
            if (item.expectation_config.type == "expect_compound_columns_to_be_unique" and keep
                    and details.get("unexpected_count")):
                _first_twins(frame, list(item.expectation_config.kwargs["column_list"]), keep, details)
        return result


def _first_twins(frame: DataFrame, columns: list[str], keep: int, details: dict[str, Any]) -> None:
    """GE on Spark lists some rows with a twin (a window's order); the pandas path lists the first ones in
    the file: the same rows here (keys compared null-safely, rows with every key value missing ignored)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    all_null = F.lit(True)
    for column in columns:
        all_null = all_null & F.col(column).isNull()
    twins = (frame.where(~all_null).withColumn("__n", F.count(F.lit(1)).over(Window.partitionBy(*columns)))
             .where(F.col("__n") > 1).orderBy(ROW).limit(keep).select(ROW))
    rows = [int(r[ROW]) for r in twins.collect()]
    details["partial_unexpected_index_list"] = rows
    details["partial_unexpected_list"] = _rows(frame, rows)[columns].to_dict("records") if rows else []


def load_events(spark: SparkSession, events: str | Path) -> DataFrame:
    """The events file as a DataFrame with each row's 0-based index in the file as `__row`."""
    from pyspark.sql import functions as F

    return spark.read.parquet(str(events)).select("*", F.col("_metadata.row_index").alias(ROW))


def _rows(frame: DataFrame, rows: list[int]) -> pd.DataFrame:
    """The file's rows at these 0-based numbers as the pandas path's batches hold them (index = row)."""
    from pyspark.sql import functions as F

    table = frame.where(F.col(ROW).isin([int(r) for r in rows])).orderBy(ROW).toArrow()
    index = table.column(ROW).to_pylist()
    result = _to_frame(table.drop_columns([ROW]), 0)
    result.index = pd.Index(index, dtype="int64")
    return result


def _examples_of(frame: DataFrame, limit: int) -> ExamplesOf:
    def examples(item) -> list[dict[str, Any]]:
        rows = list((item.result or {}).get("partial_unexpected_index_list") or [])[:limit]
        return _examples(_rows(frame, rows), rows, limit) if rows else []

    return examples


def _reasons(result) -> dict[int, list[str]]:
    """Row -> the labels of the row-level expectations it breaks, in GE's result order."""
    why: dict[int, list[str]] = {}
    for item in result.results:
        for index in (item.result or {}).get("unexpected_index_list") or []:
            why.setdefault(int(index), []).append(_label(item.expectation_config))
    return why


def _write_rows(frame: DataFrame, target: Path, scratch: Path, name: str) -> int:
    """Rows in file order into one Parquet file in the validated output's schema."""
    schema = events_schema([c for c in frame.columns if c != ROW])
    parts = scratch / name
    frame.orderBy(ROW).select(*schema.names).write.parquet(str(parts))
    return copy_parts(parts, target, schema)


def spark_validation(
    spark: SparkSession,
    events: str | Path,
    cfg: ValidateParams,
    behaviors: tuple[str, ...],
    *,
    scratch: Path,
    now: dt.datetime | None = None,
    docs_dir: Path | None = None,
) -> ValidationOutcome:
    """run_validation on Spark over the events file: clean and quarantined rows go to Parquet files
    under `scratch` (validated.parquet only if the columns are the canonical ones)."""
    from pyspark.sql import functions as F

    now = now or dt.datetime.now(dt.UTC)
    frame = load_events(spark, events)
    names = [c for c in frame.columns if c != ROW]
    text = ITEM_TEXT in names
    validator = _SparkValidator(docs_dir)
    summary_format = {"result_format": "SUMMARY", "partial_unexpected_count": cfg.example_rows}
    total = frame.count()
    clean = frame
    bad: list[int] = []
    why: dict[int, list[str]] = {}
    reasons: dict[str, int] = {}
    quarantine_path = scratch / "quarantine.parquet"

    if cfg.mode == "quarantine":
        row_suite = build_suite(cfg, behaviors, now, row_level_only=True, text=text)
        rows = validator.run(frame, row_suite, {"result_format": "COMPLETE"})
        why = _reasons(rows)
        bad = sorted(why)
        if bad:
            reasons = dict(Counter(r for i in bad for r in why[i]))
            clean = frame.where(~F.col(ROW).isin(bad))
    quarantined = _rows(frame, bad) if bad else _no_quarantine(_to_frame(pq.read_schema(events).empty_table(), 0))
    if bad:
        quarantined = quarantined.assign(reason=["; ".join(why[i]) for i in bad])
    pq.write_table(pa.Table.from_pandas(quarantined, preserve_index=False), quarantine_path, compression="zstd")
    stored_quarantine = StoredRows(quarantine_path, len(bad))

    if cfg.mode == "quarantine":
        share = len(bad) / total if total else 0.0
        if share > cfg.max_quarantine_share:
            limit = cfg.example_rows
            failed = [_quarantine_share_failure(cfg, share, len(bad), _examples(_rows(frame, bad[:limit]),
                                                                                bad[:limit], limit)),
                      *_failures(rows, _examples_of(frame, limit))]
            validator.publish(rows, row_suite, now)
            return ValidationOutcome(False, cfg.mode, total, StoredRows(scratch / "clean.parquet", total - len(bad)),
                                     stored_quarantine, failed, rows.to_json_dict(), reasons)

    suite = build_suite(cfg, behaviors, now, text=text)
    result = validator.run(clean, suite, summary_format)
    validator.publish(result, suite, now)
    failed = _failures(result, _examples_of(clean, cfg.example_rows))
    clean_path = scratch / "clean.parquet"
    missing = [name for name in EVENTS_SCHEMA.names if name not in names]
    if result.success and missing:
        raise InputError(events, f"missing canonical column(s) {missing}", column=missing[0],
                         expected=f"the columns {list(EVENTS_SCHEMA.names)} (the output of `uservalue ingest`)")
    clean_rows = total - len(bad)
    if result.success:
        clean_rows = _write_rows(clean, clean_path, scratch, "clean-parts")
    return ValidationOutcome(bool(result.success), cfg.mode, total, StoredRows(clean_path, clean_rows),
                             stored_quarantine, failed, result.to_json_dict(), reasons)


def validate_file_spark(
    events: str | Path,
    cfg: ValidateParams,
    behaviors: tuple[str, ...],
    *,
    out: str | Path,
    quarantine_out: str | Path,
    report_dir: str | Path,
    now: dt.datetime | None = None,
    spark_params: SparkParams | None = None,
    spark: SparkSession | None = None,
) -> ValidationOutcome:
    """uservalue.data.validation.validate_file on Spark: report always; outputs only when the gate passes
    (else raise ValidationFailed, leaving the last good outputs in place). Uses `spark` when given
    (tests), else opens the session of `spark_params` and stops it at the end."""
    out, quarantine_out = Path(out), Path(quarantine_out)
    own = spark is None
    session = data_spark_session(spark_params or SparkParams(), "uservalue-validate", "validate.engine") if own else spark
    python_workers(session)
    try:
        with spark_scratch(out.resolve().parent) as scratch:
            with atomic_dir(report_dir) as tmp_report:
                outcome = spark_validation(session, events, cfg, behaviors, scratch=scratch, now=now,
                                           docs_dir=tmp_report / "data_docs")
                write_json(tmp_report / "summary.json", outcome.summary())
                (tmp_report / "result.json").write_text(json.dumps(outcome.result, indent=1, default=str))
            if not outcome.success:
                raise ValidationFailed(_failure_message(events, outcome, Path(report_dir)))
            for stored, final in ((outcome.clean, out), (outcome.quarantined, quarantine_out)):
                with atomic_path(final) as tmp:
                    shutil.move(stored.path, tmp)
    finally:
        if own:
            session.stop()
    return dataclasses.replace(outcome, clean=StoredRows(out, len(outcome.clean)),
                               quarantined=StoredRows(quarantine_out, len(outcome.quarantined)))


__all__ = ["load_events", "spark_validation", "validate_file_spark"]
