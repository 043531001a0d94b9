"""The validation gate: a Great Expectations suite on the canonical events table; row-level
expectations can quarantine rows, table-level ones pass or fail (docs/data.md).

Two paths give the same verdict, failures and quarantine rows: `run_validation` (one pandas frame,
the reference, for frames built in memory) and `validate_file` (the stage: streams the Parquet file).
The stream runs the row-level expectations with GE per batch of `validate.batch_rows` rows (each batch
indexed by its global row numbers, so GE's unexpected indices are file rows) and sums their results
with GE's own result formatter; the table-level ones (uniqueness, user and purchase counts) are DuckDB
aggregates over the whole file, reported in GE's result shape; Data Docs are rendered from the one
combined result."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from uservalue import limits
from uservalue.config import ValidateParams
from uservalue.duck import connect, sql_string
from uservalue.errors import InputError, ValidationFailed
from uservalue.io import atomic_dir, atomic_path, write_json
from uservalue.schema import (
    EVENTS_SCHEMA,
    ITEM_TEXT,
    MONEY_BEHAVIORS,
    PURCHASE,
    REQUIRED_COLUMNS,
    RETURN,
    events_schema,
)

SUITE_NAME = "canonical_events"
DUPLICATE_KEY = ["user_id", "ts", "behavior", "item_id", "category_id", "quantity", "amount"]


@dataclass(frozen=True)
class FailedExpectation:
    expectation: str
    column: str | None
    description: str
    observed: Any
    unexpected_count: int | None
    examples: list[dict[str, Any]]


@dataclass(frozen=True)
class StoredRows:
    """Rows the streaming path wrote to a Parquet file instead of holding them: `len()` as a frame's."""

    path: Path
    rows: int

    def __len__(self) -> int:
        return self.rows


@dataclass
class ValidationOutcome:
    success: bool
    mode: str
    rows: int
    clean: pd.DataFrame | StoredRows
    quarantined: pd.DataFrame | StoredRows
    failed: list[FailedExpectation]
    result: dict[str, Any]
    quarantine_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def quarantine_share(self) -> float:
        return len(self.quarantined) / self.rows if self.rows else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "mode": self.mode,
            "rows": self.rows,
            "rows_valid": len(self.clean),
            "rows_quarantined": len(self.quarantined),
            "quarantine_share": round(self.quarantine_share, 6),
            "quarantine_reasons": self.quarantine_reasons,
            "failed_expectations": [f.__dict__ for f in self.failed],
            "expectations_evaluated": len(self.result.get("results", [])),
        }


def _utc_timestamp(value: dt.datetime) -> pd.Timestamp:
    return pd.Timestamp(value).tz_convert("UTC")


def build_suite(
    cfg: ValidateParams, behaviors: tuple[str, ...], now: dt.datetime, *, row_level_only: bool = False,
    text: bool = False,
):
    """The expectation suite. `meta.row_level` marks the ones whose failing rows can be quarantined.
    `text`: the table has the optional item_text column (issue 23), checked by uservalue.limits' rule."""
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    is_purchase, not_purchase = Column("behavior") == PURCHASE, Column("behavior") != PURCHASE
    no_money, no_money_where, no_money_text = not_purchase, f'behavior!="{PURCHASE}"', "non-purchases"
    if RETURN in behaviors:  # a return carries the (positive) amount given back
        no_money = Column("behavior").is_not_in(list(MONEY_BEHAVIORS))
        no_money_where = f"behavior not in {list(MONEY_BEHAVIORS)}"
        no_money_text = "behaviours other than purchases and returns"
    row_level: list[Any] = []
    for column in REQUIRED_COLUMNS:
        row_level.append(E.ExpectColumnValuesToNotBeNull(column=column))
    row_level += [
        E.ExpectColumnValuesToBeInSet(column="behavior", value_set=list(behaviors)),
        E.ExpectColumnValuesToBeBetween(column="amount", min_value=0, max_value=limits.AMOUNT_MAX),
        E.ExpectColumnValuesToBeBetween(
            column="amount", min_value=0, max_value=0,
            row_condition=no_money, description=f"amount is 0 for {no_money_text}",
            meta={"where": no_money_where},
        ),
        E.ExpectColumnValuesToBeBetween(column="quantity", min_value=0, max_value=limits.QUANTITY_MAX),
        # The service's identifier rule (uservalue.limits): what the gate passes, the service accepts.
        E.ExpectColumnValueLengthsToBeBetween(column="user_id", min_value=limits.ID_MIN_LENGTH,
                                              max_value=limits.ID_MAX_LENGTH),
        E.ExpectColumnValuesToMatchRegex(column="user_id", regex=limits.ID_PATTERN,
                                         description="user_id holds no control character (NUL, \\x1f, ...)"),
    ]
    if text:  # null text is allowed (an item without a title); GE skips nulls in both
        row_level += [
            E.ExpectColumnValueLengthsToBeBetween(column=ITEM_TEXT, min_value=limits.ITEM_TEXT_MIN_LENGTH,
                                                  max_value=limits.ITEM_TEXT_MAX_LENGTH),
            E.ExpectColumnValuesToMatchRegex(column=ITEM_TEXT, regex=limits.ITEM_TEXT_PATTERN,
                                             description="item_text holds no control character but tab, "
                                                         "newline and carriage return"),
        ]
    lower, upper = cfg.window
    lower = max(lower, limits.TS_MIN) if lower is not None else limits.TS_MIN
    # Never in the future, with the clock skew the service tolerates (uservalue.limits).
    latest = limits.latest_event_time(now)
    upper = min(upper, latest) if upper is not None else latest
    row_level.append(
        E.ExpectColumnValuesToBeBetween(
            column="ts",
            min_value=_utc_timestamp(lower),
            max_value=_utc_timestamp(upper),
            strict_max=True,
            description=f"timestamps in [{lower}, {upper}) (validate.ts_min/ts_max, not before 1970, not in the future)",
        )
    )
    table_level: list[Any] = [E.ExpectColumnToExist(column=c) for c in REQUIRED_COLUMNS]
    table_level += [
        E.ExpectCompoundColumnsToBeUnique(
            column_list=DUPLICATE_KEY, mostly=1 - cfg.max_duplicate_share,
            description=f"share of rows with an identical twin <= {cfg.max_duplicate_share} "
            "(validate.max_duplicate_share)",
        ),
        E.ExpectColumnUniqueValueCountToBeBetween(
            column="user_id", min_value=cfg.min_users,
            description=f"at least {cfg.min_users} users (validate.min_users)",
        ),
        E.ExpectTableRowCountToBeBetween(
            min_value=cfg.min_purchases,
            row_condition=is_purchase,
            description=f"at least {cfg.min_purchases} purchases (validate.min_purchases)",
            meta={"where": f'behavior=="{PURCHASE}"', "sql_where": f"behavior = {sql_string(PURCHASE)}"},
        ),
    ]
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for expectation in row_level:
        expectation.meta = {**(expectation.meta or {}), "row_level": True}
        suite.add_expectation(expectation)
    if not row_level_only:
        for expectation in table_level:
            expectation.meta = {**(expectation.meta or {}), "row_level": False}
            suite.add_expectation(expectation)
    return suite


class _Validator:
    """One ephemeral GE context (nothing written unless Data Docs are asked for)."""

    def __init__(self, docs_dir: Path | None) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.docs_dir = docs_dir
        if docs_dir is not None:
            self.ctx.add_data_docs_site(
                site_name="uservalue",
                site_config={
                    "class_name": "SiteBuilder",
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(Path(docs_dir).resolve()),
                    },
                },
            )
        self.batch_definition = (
            self.ctx.data_sources.add_pandas("events")
            .add_dataframe_asset("events")
            .add_batch_definition_whole_dataframe("all")
        )

    def run(self, frame: pd.DataFrame, suite, result_format: dict[str, Any]):
        # GE's validator on the batch definition, as a ValidationDefinition runs it: `get_batch().validate()`
        # would load (and fingerprint, a hash of every row) the frame twice.
        from great_expectations.validator.v1_validator import Validator

        validator = Validator(self.batch_definition, result_format=result_format,
                              batch_parameters={"dataframe": frame})
        return validator.validate_expectation_suite(suite)

    def publish(self, result, suite, now: dt.datetime) -> None:
        """Data Docs of one validation result: the combined one when the input was streamed in batches."""
        if self.docs_dir is None:
            return
        from great_expectations.core.run_identifier import RunIdentifier
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        self.ctx.suites.add_or_update(suite)
        suite_id = ExpectationSuiteIdentifier(name=suite.name)
        result_id = ValidationResultIdentifier(
            expectation_suite_identifier=suite_id, run_id=RunIdentifier(run_name="validate", run_time=now),
            batch_identifier="events-events",
        )
        self.ctx.validation_results_store.store_validation_results(
            suite_validation_result=result, suite_validation_result_identifier=result_id,
            expectation_suite_identifier=suite_id,
        )
        self.ctx.build_data_docs(site_names=["uservalue"], resource_identifiers=[result_id, suite_id])
        # GE's pages load Bootstrap, jQuery and Vega from CDNs: offline they render unstyled and
        # chartless. Point them at copies from installed packages (uservalue.reporting.offline).
        from uservalue.reporting.offline import make_site_offline

        make_site_offline(Path(self.docs_dir))


def _column_of(config) -> str | None:
    kwargs = config.kwargs
    return kwargs.get("column") or (",".join(kwargs["column_list"]) if "column_list" in kwargs else None)


def _label(config) -> str:
    column = _column_of(config)
    label = f"{config.type}({column})" if column else config.type
    where = (config.meta or {}).get("where")
    if where:
        label += f" where {where}"
    return label


def _examples(frame: pd.DataFrame, indices: list[Any], limit: int) -> list[dict[str, Any]]:
    """The rows at `indices` (index labels = 0-based file rows), as the error message shows them."""
    rows = []
    for index in indices[:limit]:
        if index in frame.index:
            record = {k: (None if pd.isna(v) else v) for k, v in frame.loc[index].to_dict().items()}
            rows.append({"row": int(index) + 1, **{k: str(v) if v is not None else None for k, v in record.items()}})
    return rows


ExamplesOf = Callable[[Any], list[dict[str, Any]]]  # a failed result item -> its example rows


def _failures(result, examples_of: ExamplesOf) -> list[FailedExpectation]:
    failed = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        details = item.result or {}
        exception = (item.exception_info or {}).get("exception_message")
        failed.append(
            FailedExpectation(
                expectation=_label(config),
                column=_column_of(config),
                description=config.description or "",
                observed=exception or details.get("observed_value"),
                unexpected_count=details.get("unexpected_count"),
                examples=examples_of(item),
            )
        )
    return failed


def _frame_examples(frame: pd.DataFrame, limit: int) -> ExamplesOf:
    return lambda item: _examples(frame, (item.result or {}).get("partial_unexpected_index_list") or [], limit)


def _no_quarantine(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.iloc[0:0].assign(reason=pd.Series(dtype=str))


def run_validation(
    frame: pd.DataFrame,
    cfg: ValidateParams,
    behaviors: tuple[str, ...],
    *,
    now: dt.datetime | None = None,
    docs_dir: Path | None = None,
) -> ValidationOutcome:
    """Validate `frame` in memory (the reference for the streaming path); in quarantine mode first move
    rows that break row-level expectations aside."""
    now = now or dt.datetime.now(dt.UTC)
    frame = frame.reset_index(drop=True)
    validator = _Validator(docs_dir)
    summary_format = {"result_format": "SUMMARY", "partial_unexpected_count": cfg.example_rows}
    clean, quarantined, reasons = frame, _no_quarantine(frame), {}

    if cfg.mode == "quarantine":
        row_suite = build_suite(cfg, behaviors, now, row_level_only=True, text=ITEM_TEXT in frame.columns)
        rows = validator.run(frame, row_suite, {"result_format": "COMPLETE"})
        why = _reasons(rows)
        if why:
            bad = sorted(why)
            quarantined = frame.loc[bad].assign(reason=["; ".join(why[i]) for i in bad])
            reasons = dict(Counter(r for i in bad for r in why[i]))
            clean = frame.drop(index=bad)
        share = len(quarantined) / len(frame) if len(frame) else 0.0
        if share > cfg.max_quarantine_share:
            failed = [
                _quarantine_share_failure(cfg, share, len(quarantined),
                                          _examples(frame, list(quarantined.index), cfg.example_rows)),
                *_failures(rows, _frame_examples(frame, cfg.example_rows)),
            ]
            validator.publish(rows, row_suite, now)
            return ValidationOutcome(False, cfg.mode, len(frame), clean, quarantined, failed,
                                     rows.to_json_dict(), reasons)

    suite = build_suite(cfg, behaviors, now, text=ITEM_TEXT in frame.columns)
    result = validator.run(clean, suite, summary_format)
    validator.publish(result, suite, now)
    failed = _failures(result, _frame_examples(clean, cfg.example_rows))
    return ValidationOutcome(
        bool(result.success), cfg.mode, len(frame), clean.reset_index(drop=True), quarantined,
        failed, result.to_json_dict(), reasons,
    )


def _reasons(result) -> dict[int, list[str]]:
    """Row (index label) -> the labels of the row-level expectations it breaks, in GE's result order."""
    why: dict[int, list[str]] = {}
    for item in result.results:
        for index in (item.result or {}).get("unexpected_index_list") or []:
            why.setdefault(int(index), []).append(_label(item.expectation_config))
    return why


def _quarantine_share_failure(cfg: ValidateParams, share: float, count: int,
                              examples: list[dict[str, Any]]) -> FailedExpectation:
    return FailedExpectation(
        expectation="quarantine share",
        column=None,
        description=f"at most {cfg.max_quarantine_share} of rows may be quarantined "
        "(validate.max_quarantine_share)",
        observed=round(share, 6),
        unexpected_count=count,
        examples=examples,
    )


# ---------------------------------------------------------------- streaming


def _raised(item) -> bool:
    return bool((item.exception_info or {}).get("raised_exception"))


class _Tally:
    """One row-level expectation's results summed over batches; GE's own map formatter renders the sum,
    so the combined result reads as if GE had seen the whole file at once."""

    def __init__(self, keep: int, example_rows: int) -> None:
        self.keep = keep  # the result format's partial_unexpected_count
        self.example_limit = min(example_rows, keep)  # examples come from the partial index list
        self.first = None
        self.raised = None  # GE raised (e.g. a missing column): that result stands as it is
        self.element = self.missing = self.unexpected = 0
        self.has_missing = False
        self.values: list[Any] = []
        self.indices: list[int] = []
        self.examples: list[dict[str, Any]] = []

    def add(self, item, frame: pd.DataFrame) -> None:
        if self.first is None:
            self.first = item
        if self.raised is not None:
            return
        if _raised(item):
            self.raised = item
            return
        details = item.result or {}
        self.element += details.get("element_count") or 0
        if "missing_count" in details:
            self.has_missing = True
            self.missing += details["missing_count"] or 0
        self.unexpected += details.get("unexpected_count") or 0
        indices = list(details.get("partial_unexpected_index_list") or [])
        room = self.keep - len(self.indices)
        if room > 0:
            self.values += list(details.get("partial_unexpected_list") or [])[:room]
            self.indices += indices[:room]
        room = self.example_limit - len(self.examples)
        if room > 0:
            self.examples += _examples(frame, indices, room)

    def result(self, config, result_format: dict[str, Any]):
        from great_expectations.core import ExpectationValidationResult
        from great_expectations.expectations.expectation import (
            _format_map_output,
            parse_result_format,
        )

        if self.raised is not None:
            return self.raised
        nonnull = self.element - self.missing if self.has_missing else None
        considered = self.element if nonnull is None else nonnull
        success = _map_success(considered, self.unexpected, config)
        formatted = _format_map_output(
            parse_result_format(result_format), success, element_count=self.element, nonnull_count=nonnull,
            unexpected_count=self.unexpected, unexpected_list=self.values, unexpected_index_list=self.indices,
        )
        return ExpectationValidationResult(success=success, expectation_config=config, result=formatted["result"],
                                           meta=self.first.meta, exception_info=self.first.exception_info)


def _map_success(considered: int, unexpected: int, config) -> bool:
    """GE's rule for map expectations: vacuously true on no rows, else the `mostly` share."""
    from great_expectations.expectations.expectation import _mostly_success

    if considered == 0:
        return True
    mostly = config.kwargs.get("mostly")
    return _mostly_success(considered, unexpected, 1.0 if mostly is None else mostly)


class _Tallies:
    """Every row-level expectation of one suite run, in GE's result order (the first batch's)."""

    def __init__(self, keep: int, example_rows: int) -> None:
        self.keep, self.example_rows = keep, example_rows
        self.by_label: dict[str, _Tally] = {}

    def add(self, result, frame: pd.DataFrame) -> None:
        for item in result.results:
            label = _label(item.expectation_config)
            self.by_label.setdefault(label, _Tally(self.keep, self.example_rows)).add(item, frame)

    def results(self, result_format: dict[str, Any], configs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {label: tally.result((configs or {}).get(label, tally.first.expectation_config), result_format)
                for label, tally in self.by_label.items()}

    def examples_of(self, item) -> list[dict[str, Any]]:
        tally = self.by_label.get(_label(item.expectation_config))
        return tally.examples if tally is not None else []


def _suite_result(template, items: list[Any]):
    """A GE suite result holding `items` (the template run gives its meta: suite, batch, GE version)."""
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.validator.validation_statistics import calc_validation_statistics

    stats = calc_validation_statistics(items)
    return ExpectationSuiteValidationResult(
        success=stats.success, results=items, suite_name=template.suite_name,
        suite_parameters=template.suite_parameters,
        statistics={"evaluated_expectations": stats.evaluated_expectations,
                    "successful_expectations": stats.successful_expectations,
                    "unsuccessful_expectations": stats.unsuccessful_expectations,
                    "success_percent": stats.success_percent},
        meta=template.meta, batch_id=template.batch_id,
    )


_STRINGS = {pa.string(): pd.StringDtype("pyarrow")}.get  # about half the memory of Python strings


def _to_frame(table: pa.Table | pa.RecordBatch, first_row: int) -> pd.DataFrame:
    """A batch as pandas, indexed by its 0-based row numbers in the file (so GE reports file rows)."""
    frame = table.to_pandas(types_mapper=_STRINGS)
    frame.index = pd.RangeIndex(first_row, first_row + len(frame))
    return frame


def _batches(parquet: pq.ParquetFile, batch_rows: int) -> Iterator[tuple[int, pa.Table]]:
    """(first row, batch) over the file; an empty file gives one empty batch, as the frame path sees it."""
    first_row = 0
    for batch in parquet.iter_batches(batch_size=batch_rows):
        table = pa.Table.from_batches([batch])
        yield first_row, table
        first_row += table.num_rows
    if first_row == 0:
        yield 0, parquet.schema_arrow.empty_table()


class _RowSink:
    """A Parquet file written batch by batch; its schema is the first batch's (as the frame path's)."""

    def __init__(self, path: Path) -> None:
        self.path, self.rows = path, 0
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        elif table.schema != self.writer.schema:
            table = table.cast(self.writer.schema)
        self.writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> StoredRows:
        if self.writer is not None:
            self.writer.close()
        return StoredRows(self.path, self.rows)


def _canonical(table: pa.Table) -> pa.Table | None:
    """The validated output's exact schema; None when a column is missing (the gate fails then anyway)."""
    schema = events_schema(table.schema)  # with item_text when the events have it (issue 23)
    try:
        return table.select(schema.names).cast(schema)
    except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


@dataclass
class _Stream:
    """What one pass over the file leaves: row-level tallies, quarantine and clean rows on disk."""

    rows: int = 0
    bad_rows: int = 0
    reasons: Counter = field(default_factory=Counter)
    quarantine_examples: list[dict[str, Any]] = field(default_factory=list)
    clean_writable: bool = True


def _stream_rows(events: Path, cfg: ValidateParams, validator: _Validator, row_suite, *, scratch: Path,
                 quarantine_tally: _Tallies, clean_tally: _Tallies) -> tuple[_Stream, _RowSink, _RowSink, _RowSink]:
    """One pass: per batch, quarantine (in quarantine mode) then the row-level suite on the clean rows."""
    summary_format = {"result_format": "SUMMARY", "partial_unexpected_count": cfg.example_rows}
    state = _Stream()
    clean, quarantined, bad_index = (_RowSink(scratch / "clean.parquet"), _RowSink(scratch / "quarantine.parquet"),
                                     _RowSink(scratch / "bad_rows.parquet"))
    for first_row, table in _batches(pq.ParquetFile(events), cfg.batch_rows):
        frame = _to_frame(table, first_row)
        state.rows += len(frame)
        if cfg.mode != "quarantine":
            clean_tally.add(validator.run(frame, row_suite, summary_format), frame)
            _write_clean(state, clean, table)
            continue
        rows = validator.run(frame, row_suite, {"result_format": "COMPLETE"})
        quarantine_tally.add(rows, frame)
        why = _reasons(rows)
        if not why:  # the common batch: all rows clean, and the result already counts them
            clean_tally.add(rows, frame)
            _write_clean(state, clean, table)
            continue
        bad = sorted(why)
        reasons = ["; ".join(why[i]) for i in bad]
        quarantined.write(pa.Table.from_pandas(frame.loc[bad].assign(reason=reasons), preserve_index=False))
        bad_index.write(pa.table({"row": pa.array(bad, pa.int64())}))
        state.reasons.update(r for i in bad for r in why[i])
        state.bad_rows += len(bad)
        room = cfg.example_rows - len(state.quarantine_examples)
        if room > 0:
            state.quarantine_examples += _examples(frame, bad, room)
        kept = frame.drop(index=bad)
        clean_tally.add(validator.run(kept, row_suite, summary_format), kept)
        mask = pa.array(~frame.index.isin(bad))
        _write_clean(state, clean, table.filter(mask))
    return state, clean, quarantined, bad_index


def _write_clean(state: _Stream, sink: _RowSink, table: pa.Table) -> None:
    canonical = _canonical(table) if state.clean_writable else None
    if canonical is None:
        state.clean_writable = False
        return
    sink.write(canonical)


class _Aggregates:
    """Table-level expectations as DuckDB aggregates over the clean rows of the whole file, in GE's shape.

    Every count comes from one scan of the file (`scan`); the duplicate key needs one more (a GROUP BY
    of its hash), and a third only when some hash repeats. At 10^8 rows each scan is tens of seconds."""

    def __init__(self, events: Path, bad_rows: Path | None, summary_format: dict[str, Any]) -> None:
        self.events, self.format = events, summary_format
        self.con = connect()
        self.con.execute("SET TimeZone = 'UTC'")
        source = f"read_parquet({sql_string(str(events))}, file_row_number = true)"
        where = ""
        if bad_rows is not None:
            where = f"WHERE file_row_number NOT IN (SELECT row FROM read_parquet({sql_string(str(bad_rows))}))"
        self.con.execute(f"CREATE TEMP VIEW clean AS SELECT * EXCLUDE (file_row_number), "
                         f"file_row_number AS __row FROM {source} {where}")
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[dict[str, Any]]] = {}

    def close(self) -> None:
        self.con.close()

    def scan(self, configs: list[Any]) -> None:
        """Every count the expectations need, in one pass over the clean rows."""
        expressions: dict[str, str] = {}
        for config in configs:
            label, kind, kwargs = _label(config), config.type, config.kwargs
            if kind == "expect_column_unique_value_count_to_be_between":
                expressions[label] = f'count(DISTINCT "{kwargs["column"]}")'
            elif kind == "expect_table_row_count_to_be_between":
                where = (config.meta or {}).get("sql_where")
                if kwargs.get("row_condition") is not None and not where:
                    raise AssertionError(f"{label}: a row condition needs meta.sql_where to run as SQL")
                expressions[label] = f"count(*) FILTER (WHERE {where})" if where else "count(*)"
            elif kind == "expect_compound_columns_to_be_unique":
                expressions[f"{label} element"] = "count(*)"
                expressions[f"{label} nonnull"] = f"count(*) FILTER (WHERE {_not_all_null(kwargs['column_list'])})"
            else:
                raise AssertionError(f"{kind}: no DuckDB aggregate for this table-level expectation; add one here")
        if not expressions:
            return
        names = list(expressions)
        select = ", ".join(f"{sql} AS c{i}" for i, sql in enumerate(expressions.values()))
        values = self.con.execute(f"SELECT {select} FROM clean").fetchone()
        self.counts = {name: int(value) for name, value in zip(names, values, strict=True)}

    def evaluate(self, config, example_rows: int) -> tuple[bool, dict[str, Any]]:
        label = _label(config)
        if config.type == "expect_compound_columns_to_be_unique":
            return self._compound_unique(config, example_rows)
        observed = self.counts[label]
        return _between(observed, config.kwargs), {"observed_value": observed}

    def _compound_unique(self, config, example_rows: int) -> tuple[bool, dict[str, Any]]:
        """Rows whose key has a twin (pandas' duplicated(keep=False), as GE computes it); rows with every key
        value missing are ignored (GE's ignore_row_if default for this expectation)."""
        from great_expectations.expectations.expectation import (
            _format_map_output,
            parse_result_format,
        )

        label = _label(config)
        columns = [f'"{c}"' for c in config.kwargs["column_list"]]
        keys = ", ".join(columns)
        considered = (f"SELECT {keys}, hash({keys}) AS __key, __row FROM clean "
                      f"WHERE {_not_all_null(config.kwargs['column_list'])}")
        # Group by a 64-bit hash of the key first (16 bytes a row instead of the whole key: at 10^8 rows
        # the aggregate fits the memory limit), then count exactly, by the key itself, among the rows
        # whose hash repeats; a collision can add candidates, never twins.
        self.con.execute(f"CREATE TEMP TABLE candidates AS SELECT __key FROM ({considered}) "
                         f"GROUP BY __key HAVING count(*) > 1")
        unexpected, rows = 0, []
        if self.scalar("SELECT count(*) FROM candidates"):
            self.con.execute(f"CREATE TEMP TABLE twins AS SELECT {keys}, count(*) AS n FROM ({considered}) "
                             f"WHERE __key IN (SELECT __key FROM candidates) GROUP BY ALL HAVING count(*) > 1")
            unexpected = int(self.scalar("SELECT coalesce(sum(n), 0) FROM twins"))
        keep = self.format["partial_unexpected_count"]
        if unexpected:
            match = " AND ".join(f"c.{c} IS NOT DISTINCT FROM t.{c}" for c in columns)
            rows = [r for (r,) in self.con.execute(
                f"SELECT c.__row FROM ({considered}) c SEMI JOIN twins t ON {match} ORDER BY c.__row LIMIT {keep}"
            ).fetchall()]
        frame = self._rows(rows)
        element, nonnull = self.counts[f"{label} element"], self.counts[f"{label} nonnull"]
        success = _map_success(nonnull, unexpected, config)
        formatted = _format_map_output(
            parse_result_format(self.format), success, element_count=element, nonnull_count=nonnull,
            unexpected_count=unexpected, unexpected_list=frame[list(config.kwargs["column_list"])].to_dict("records"),
            unexpected_index_list=rows,
        )
        self.examples[label] = _examples(frame, rows, min(example_rows, keep))
        return success, formatted["result"]

    def scalar(self, sql: str) -> Any:
        return self.con.execute(sql).fetchone()[0]

    def _rows(self, rows: list[int]) -> pd.DataFrame:
        """The file's rows at these 0-based numbers, typed as the batches are."""
        import pyarrow.dataset as ds

        if not rows:  # Dataset.take of nothing still scans the file
            return _to_frame(pq.ParquetFile(self.events).schema_arrow.empty_table(), 0)
        # Reads only the row groups holding these rows.
        table = ds.dataset(self.events, format="parquet").take(pa.array(rows, pa.int64()))
        frame = table.to_pandas(types_mapper=_STRINGS)
        frame.index = pd.Index(rows)
        return frame


def _not_all_null(columns: list[str]) -> str:
    return "NOT (" + " AND ".join(f'"{c}" IS NULL' for c in columns) + ")"


def _between(observed: int, kwargs: dict[str, Any]) -> bool:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    return (low is None or observed >= low) and (high is None or observed <= high)


def stream_validation(
    events: str | Path,
    cfg: ValidateParams,
    behaviors: tuple[str, ...],
    *,
    scratch: Path,
    now: dt.datetime | None = None,
    docs_dir: Path | None = None,
) -> ValidationOutcome:
    """`run_validation` over a Parquet file without loading it: the same verdict, failures and quarantine
    rows; clean and quarantined rows go to Parquet files under `scratch`."""
    from great_expectations.core import ExpectationValidationResult

    events = Path(events)
    now = now or dt.datetime.now(dt.UTC)
    validator = _Validator(docs_dir)
    summary_format = {"result_format": "SUMMARY", "partial_unexpected_count": cfg.example_rows}
    quarantine_format = {"result_format": "SUMMARY", "partial_unexpected_count": 20}  # GE's COMPLETE default
    text = ITEM_TEXT in pq.ParquetFile(events).schema_arrow.names
    row_suite = build_suite(cfg, behaviors, now, row_level_only=True, text=text)
    quarantine_tally = _Tallies(keep=20, example_rows=cfg.example_rows)
    clean_tally = _Tallies(keep=cfg.example_rows, example_rows=cfg.example_rows)
    state, clean_sink, quarantine_sink, bad_sink = _stream_rows(
        events, cfg, validator, row_suite, scratch=scratch, quarantine_tally=quarantine_tally, clean_tally=clean_tally)
    if quarantine_sink.rows == 0:  # same empty table (and schema) as the frame path writes
        template = _to_frame(pq.ParquetFile(events).schema_arrow.empty_table(), 0)
        quarantine_sink.write(pa.Table.from_pandas(_no_quarantine(template), preserve_index=False))
    clean_rows, quarantined, bad_rows = clean_sink.close(), quarantine_sink.close(), bad_sink.close()
    clean = StoredRows(clean_rows.path, state.rows - state.bad_rows)
    reasons = dict(state.reasons)

    if cfg.mode == "quarantine":
        share = state.bad_rows / state.rows if state.rows else 0.0
        if share > cfg.max_quarantine_share:
            template = validator.run(_to_frame(pq.ParquetFile(events).schema_arrow.empty_table(), 0),
                                     row_suite, quarantine_format)
            items = list(quarantine_tally.results(quarantine_format).values())
            result = _suite_result(template, items)
            failed = [_quarantine_share_failure(cfg, share, state.bad_rows, state.quarantine_examples),
                      *_failures(result, quarantine_tally.examples_of)]
            validator.publish(result, row_suite, now)
            return ValidationOutcome(False, cfg.mode, state.rows, clean, quarantined, failed,
                                     result.to_json_dict(), reasons)

    # GE orders results by domain, not by suite: a run on the empty table gives its order (and GE's own
    # verdict for table-level expectations whose columns are missing, which DuckDB cannot name as GE does).
    suite = build_suite(cfg, behaviors, now, text=text)
    empty = _to_frame(pq.ParquetFile(events).schema_arrow.empty_table(), 0)
    template = validator.run(empty, suite, summary_format)
    labels = [_label(item.expectation_config) for item in template.results]
    if len(set(labels)) != len(labels):
        raise AssertionError(f"expectation labels must be unique to combine batches: {labels}")
    configs = {label: item.expectation_config for label, item in zip(labels, template.results, strict=True)}
    row_level = clean_tally.results(summary_format, configs)
    columns = set(empty.columns)
    aggregates = _Aggregates(events, bad_rows.path if bad_rows.rows else None, summary_format)
    # The schema decides expect_column_to_exist and any expectation on a missing column: GE's verdict on
    # the empty table is the file's. The others are aggregates.
    by_schema = {label for label, item in zip(labels, template.results, strict=True)
                 if label not in row_level and (item.expectation_config.type == "expect_column_to_exist"
                                                or not _columns_of(item.expectation_config) <= columns)}
    try:
        aggregates.scan([item.expectation_config for label, item in zip(labels, template.results, strict=True)
                         if label not in row_level and label not in by_schema])
        items = []
        for label, item in zip(labels, template.results, strict=True):
            config = item.expectation_config
            if label in row_level:
                items.append(row_level[label])
            elif label in by_schema:
                items.append(item)
            else:
                success, details = aggregates.evaluate(config, cfg.example_rows)
                items.append(ExpectationValidationResult(success=success, expectation_config=config, result=details,
                                                         meta=item.meta, exception_info=item.exception_info))
    finally:
        aggregates.close()
    result = _suite_result(template, items)
    validator.publish(result, suite, now)
    if result.success and not state.clean_writable:
        # The gate checks only the required columns; the output holds every canonical one.
        missing = [name for name in EVENTS_SCHEMA.names if name not in columns]
        raise InputError(events, f"missing canonical column(s) {missing}", column=missing[0] if missing else None,
                         expected=f"the columns {list(EVENTS_SCHEMA.names)} (the output of `uservalue ingest`)")

    def examples_of(item) -> list[dict[str, Any]]:
        label = _label(item.expectation_config)
        return aggregates.examples.get(label) or clean_tally.examples_of(item)

    failed = _failures(result, examples_of)
    return ValidationOutcome(bool(result.success), cfg.mode, state.rows, clean, quarantined, failed,
                             result.to_json_dict(), reasons)


def _columns_of(config) -> set[str]:
    kwargs = config.kwargs
    return set(kwargs.get("column_list") or ([kwargs["column"]] if "column" in kwargs else []))


def validate_file(
    events: str | Path,
    cfg: ValidateParams,
    behaviors: tuple[str, ...],
    *,
    out: str | Path,
    quarantine_out: str | Path,
    report_dir: str | Path,
    now: dt.datetime | None = None,
) -> ValidationOutcome:
    """The validate stage, streamed (bounded memory): report always; outputs only when the gate passes
    (else raise, leaving the last good outputs in place)."""
    out, quarantine_out = Path(out), Path(quarantine_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Scratch next to the output (same disk, so the final move is a rename); removed whatever happens.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        with atomic_dir(report_dir) as tmp_report:
            outcome = stream_validation(events, cfg, behaviors, scratch=Path(scratch), now=now,
                                        docs_dir=tmp_report / "data_docs")
            write_json(tmp_report / "summary.json", outcome.summary())
            (tmp_report / "result.json").write_text(json.dumps(outcome.result, indent=1, default=str))
        if not outcome.success:
            raise ValidationFailed(_failure_message(events, outcome, Path(report_dir)))
        for stored, final in ((outcome.clean, out), (outcome.quarantined, quarantine_out)):
            with atomic_path(final) as tmp:
                shutil.move(stored.path, tmp)
    return dataclasses.replace(outcome, clean=StoredRows(out, len(outcome.clean)),
                               quarantined=StoredRows(quarantine_out, len(outcome.quarantined)))


def _failure_message(events: str | Path, outcome: ValidationOutcome, report_dir: Path) -> str:
    lines = [(f"{events}: {len(outcome.failed)} expectation(s) failed (report: {report_dir}/summary.json, "
              f"Data Docs: {report_dir}/data_docs/index.html)")]
    for failure in outcome.failed:
        count = f", {failure.unexpected_count} rows" if failure.unexpected_count is not None else ""
        lines.append(f"  - {failure.expectation}: observed {failure.observed!r}{count}"
                     + (f" [{failure.description}]" if failure.description else ""))
        for example in failure.examples:
            lines.append(f"      e.g. {example}")
    return "\n".join(lines)
