"""The validation gate: a Great Expectations suite on the canonical events table; row-level
expectations can quarantine rows, table-level ones pass or fail (docs/data.md)."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from uservalue.config import ValidateParams
from uservalue.errors import ValidationFailed
from uservalue.io import atomic_dir, atomic_path, write_json
from uservalue.schema import PURCHASE, REQUIRED_COLUMNS

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


@dataclass
class ValidationOutcome:
    success: bool
    mode: str
    rows: int
    clean: pd.DataFrame
    quarantined: pd.DataFrame
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
    cfg: ValidateParams, behaviors: tuple[str, ...], now: dt.datetime, *, row_level_only: bool = False
):
    """The expectation suite. `meta.row_level` marks the ones whose failing rows can be quarantined."""
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    is_purchase, not_purchase = Column("behavior") == PURCHASE, Column("behavior") != PURCHASE
    row_level: list[Any] = []
    for column in REQUIRED_COLUMNS:
        row_level.append(E.ExpectColumnValuesToNotBeNull(column=column))
    row_level += [
        E.ExpectColumnValuesToBeInSet(column="behavior", value_set=list(behaviors)),
        E.ExpectColumnValuesToBeBetween(column="amount", min_value=0),
        E.ExpectColumnValuesToBeBetween(
            column="amount", min_value=0, max_value=0,
            row_condition=not_purchase, description="amount is 0 for non-purchases",
            meta={"where": f'behavior!="{PURCHASE}"'},
        ),
        E.ExpectColumnValuesToBeBetween(column="quantity", min_value=0),
    ]
    lower, upper = cfg.window
    upper = min(upper, now) if upper is not None else now  # never in the future
    row_level.append(
        E.ExpectColumnValuesToBeBetween(
            column="ts",
            min_value=_utc_timestamp(lower) if lower is not None else None,
            max_value=_utc_timestamp(upper),
            strict_max=True,
            description=f"timestamps in [{lower or '-inf'}, {upper}) (validate.ts_min/ts_max, not in the future)",
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
            meta={"where": f'behavior=="{PURCHASE}"'},
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

        self.gx = gx
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
        self._runs = 0

    def run(self, frame: pd.DataFrame, suite, result_format: dict[str, Any]):
        self._runs += 1
        if self.docs_dir is None:
            batch = self.batch_definition.get_batch(batch_parameters={"dataframe": frame})
            return batch.validate(suite, result_format=result_format)
        gx = self.gx
        suite = self.ctx.suites.add_or_update(suite)
        definition = self.ctx.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"{SUITE_NAME}_{self._runs}", data=self.batch_definition, suite=suite)
        )
        checkpoint = self.ctx.checkpoints.add_or_update(
            gx.Checkpoint(
                name=f"validate_{self._runs}",
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["uservalue"])],
                result_format=result_format,
            )
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": frame})
        return next(iter(outcome.run_results.values()))


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
    rows = []
    for index in indices[:limit]:
        if index in frame.index:
            record = {k: (None if pd.isna(v) else v) for k, v in frame.loc[index].to_dict().items()}
            rows.append({"row": int(index) + 1, **{k: str(v) if v is not None else None for k, v in record.items()}})
    return rows


def _failures(result, frame: pd.DataFrame, limit: int) -> list[FailedExpectation]:
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
                examples=_examples(frame, details.get("partial_unexpected_index_list") or [], limit),
            )
        )
    return failed


def run_validation(
    frame: pd.DataFrame,
    cfg: ValidateParams,
    behaviors: tuple[str, ...],
    *,
    now: dt.datetime | None = None,
    docs_dir: Path | None = None,
) -> ValidationOutcome:
    """Validate `frame`; in quarantine mode first move rows that break row-level expectations aside."""
    now = now or dt.datetime.now(dt.UTC)
    frame = frame.reset_index(drop=True)
    validator = _Validator(docs_dir)
    summary_format = {"result_format": "SUMMARY", "partial_unexpected_count": cfg.example_rows}
    clean, quarantined, reasons = frame, frame.iloc[0:0].assign(reason=pd.Series(dtype=str)), {}

    if cfg.mode == "quarantine":
        rows = validator.run(
            frame, build_suite(cfg, behaviors, now, row_level_only=True), {"result_format": "COMPLETE"}
        )
        why: dict[int, list[str]] = {}
        for item in rows.results:
            for index in (item.result or {}).get("unexpected_index_list") or []:
                why.setdefault(int(index), []).append(_label(item.expectation_config))
        if why:
            bad = sorted(why)
            quarantined = frame.loc[bad].assign(reason=["; ".join(why[i]) for i in bad])
            reasons = dict(Counter(r for i in bad for r in why[i]))
            clean = frame.drop(index=bad)
        share = len(quarantined) / len(frame) if len(frame) else 0.0
        if share > cfg.max_quarantine_share:
            failed = [
                FailedExpectation(
                    expectation="quarantine share",
                    column=None,
                    description=f"at most {cfg.max_quarantine_share} of rows may be quarantined "
                    "(validate.max_quarantine_share)",
                    observed=round(share, 6),
                    unexpected_count=len(quarantined),
                    examples=_examples(frame, list(quarantined.index), cfg.example_rows),
                ),
                *_failures(rows, frame, cfg.example_rows),
            ]
            return ValidationOutcome(False, cfg.mode, len(frame), clean, quarantined, failed,
                                     rows.to_json_dict(), reasons)

    result = validator.run(clean, build_suite(cfg, behaviors, now), summary_format)
    failed = _failures(result, clean, cfg.example_rows)
    return ValidationOutcome(
        bool(result.success), cfg.mode, len(frame), clean.reset_index(drop=True), quarantined,
        failed, result.to_json_dict(), reasons,
    )


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
    """The validate stage: report always; outputs only when the gate passes (else raise)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from uservalue.schema import EVENTS_SCHEMA

    # Arrow-backed strings: about half the memory of Python string objects, validated alike.
    frame = pq.read_table(events).to_pandas(types_mapper={pa.string(): pd.StringDtype("pyarrow")}.get)
    with atomic_dir(report_dir) as tmp_report:
        outcome = run_validation(frame, cfg, behaviors, now=now, docs_dir=tmp_report / "data_docs")
        write_json(tmp_report / "summary.json", outcome.summary())
        (tmp_report / "result.json").write_text(json.dumps(outcome.result, indent=1, default=str))
    if not outcome.success:
        raise ValidationFailed(_failure_message(events, outcome, Path(report_dir)))
    # The gate passed, so every canonical column exists: write exactly the canonical schema.
    clean = pa.Table.from_pandas(outcome.clean, preserve_index=False).select(EVENTS_SCHEMA.names).cast(EVENTS_SCHEMA)
    with atomic_path(out) as tmp:
        pq.write_table(clean, tmp, compression="zstd")
    with atomic_path(quarantine_out) as tmp:
        pq.write_table(pa.Table.from_pandas(outcome.quarantined, preserve_index=False), tmp, compression="zstd")
    return outcome


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
