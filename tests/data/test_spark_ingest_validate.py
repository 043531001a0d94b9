"""Ingest and validation on Spark equal the DuckDB/pandas path (issue 14 §1): the canonical events tables
of both engines' ingest (CDNOW, a tabular log with every behaviour as CSV and Parquet with guest lines
set aside, Taobao's format), the errors naming a bad row, and the validation verdicts, failures and
quarantined rows (with their reasons) on a log with planted bad rows. Real PySpark in local mode, the
session of test_spark_parity (one JVM for both files); nothing is mocked."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tests.data.test_spark_parity import spark  # noqa: F401  (the session-scoped Spark session)
from uservalue.config import DataParams, FileSource, ValidateParams
from uservalue.data.sources import ingest
from uservalue.data.sources.event_log import EVENT_LOG_SCHEMA
from uservalue.data.sources.taobao import export_taobao_csv
from uservalue.data.spark_ingest import SORT_KEY, ingest_spark
from uservalue.data.spark_validation import validate_file_spark
from uservalue.data.validation import validate_file
from uservalue.errors import InputError, ValidationFailed
from uservalue.schema import DEFAULT_BEHAVIORS, EVENTS_SCHEMA, PURCHASE

pytestmark = pytest.mark.slow


def _sorted(table: pa.Table) -> pa.Table:
    """Rows in one total order (the stage sorts by SORT_KEY; rows tied on it may come in any order)."""
    return table.sort_by([(c, "ascending") for c in table.column_names])


def assert_same_events(duck_path: Path, spark_path: Path) -> None:
    duck, spark_table = pq.read_table(duck_path), pq.read_table(spark_path)
    assert spark_table.schema.equals(duck.schema)
    assert spark_table.num_rows == duck.num_rows > 0
    # Sorted as DuckDB sorts (item_id nulls first): the key columns come in the same order...
    for column in SORT_KEY:
        assert spark_table.column(column).equals(duck.column(column)), column
    # ...and the rows are the same, value for value.
    assert _sorted(spark_table).equals(_sorted(duck))


def _both(params: DataParams, tmp_path: Path, spark) -> tuple[object, object]:  # noqa: F811
    duck = ingest(params, tmp_path / "duck" / "events.parquet", tmp_path / "duck" / "truth")
    on_spark = ingest_spark(params, tmp_path / "spark" / "events.parquet", tmp_path / "spark" / "truth",
                            spark=spark)
    assert on_spark.events == duck.events
    assert on_spark.rejected == duck.rejected
    assert_same_events(duck.out, on_spark.out)
    assert (on_spark.rejects.read_text() == duck.rejects.read_text())
    assert (tmp_path / "spark" / "truth" / "truth.json").read_text() == (
        tmp_path / "duck" / "truth" / "truth.json").read_text()
    return duck, on_spark


def test_cdnow_events_equal_on_both_engines(spark, tmp_path: Path) -> None:  # noqa: F811
    duck, _ = _both(DataParams(source="cdnow"), tmp_path, spark)
    assert duck.events == 69_659


@pytest.fixture(scope="module")
def tabular_log(small_synthetic: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A slice of the synthetic log with every behaviour, as the file source reads it: CSV (ISO times,
    three guest lines without a user, a float-written id) and Parquet; and in Taobao's format."""
    folder = tmp_path_factory.mktemp("tabular")
    events = pq.read_table(small_synthetic[0])
    users = pc.unique(events.column("user_id")).slice(0, 150)
    table = events.filter(pc.is_in(events.column("user_id"), users))
    assert set(table.column("behavior").to_pylist()) == set(DEFAULT_BEHAVIORS)
    pq.write_table(table, folder / "log.parquet")
    frame = table.to_pandas()
    frame["ts"] = frame["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    frame.loc[[3, 40, 41], "user_id"] = None  # guests
    frame.loc[7, "item_id"] = "12345.0"  # a spreadsheet's float id
    pacsv.write_csv(pa.Table.from_pandas(frame, preserve_index=False), folder / "log.csv")
    export_taobao_csv(folder / "log.parquet", folder / "taobao.csv")
    return {"parquet": folder / "log.parquet", "csv": folder / "log.csv", "taobao": folder / "taobao.csv"}


def _file_params(path: Path, **file: object) -> DataParams:
    return DataParams(source="file", path=str(path), file=FileSource(**{"missing_user": "drop", **file}))


def test_csv_events_and_rejects_equal_on_both_engines(spark, tabular_log, tmp_path: Path) -> None:  # noqa: F811
    duck, _ = _both(_file_params(tabular_log["csv"]), tmp_path, spark)
    assert duck.rejected == {"missing user id": 3}


def _event_log(folder: Path) -> Path:
    """The service's event log: two days, an event logged twice (counted once), one without an id."""
    rows = [("u-new", "2024-01-02T10:00:00", "buy", "e1"), ("u-new", "2024-01-02T10:00:00", "buy", "e1"),
            ("u-new", "2024-01-03T09:00:00", "view", None), ("u0001", "2024-01-03T09:30:00", "cart", "e2")]
    for day, chunk in (("2024-01-02", rows[:2]), ("2024-01-03", rows[2:])):
        (folder / f"date={day}").mkdir(parents=True)
        table = pa.table({"user_id": [r[0] for r in chunk],
                          "ts": pa.array([dt.datetime.fromisoformat(r[1]).replace(tzinfo=dt.UTC) for r in chunk],
                                         pa.timestamp("us", tz="UTC")),
                          "behavior": [r[2] for r in chunk], "item_id": ["i9"] * len(chunk),
                          "category_id": [None] * len(chunk), "quantity": [1.0] * len(chunk),
                          "amount": [5.0 if r[2] == PURCHASE else 0.0 for r in chunk],
                          "event_id": [r[3] for r in chunk]})
        pq.write_table(table.cast(EVENT_LOG_SCHEMA), folder / f"date={day}" / "part-0.parquet")
    return folder


def test_parquet_and_taobao_events_equal_on_both_engines(spark, tabular_log, tmp_path: Path) -> None:  # noqa: F811
    params = _file_params(tabular_log["parquet"]).model_copy(update={"event_log": str(_event_log(tmp_path / "log"))})
    duck, _ = _both(params, tmp_path / "parquet", spark)
    assert duck.events == pq.read_metadata(tabular_log["parquet"]).num_rows + 3  # the log's events, once each
    _both(DataParams(source="taobao", path=str(tabular_log["taobao"])), tmp_path / "taobao", spark)


def test_a_bad_row_is_named_alike_on_both_engines(spark, tabular_log, tmp_path: Path) -> None:  # noqa: F811
    lines = tabular_log["csv"].read_text().splitlines()
    bad_value, bad_shape = tmp_path / "bad_value.csv", tmp_path / "bad_shape.csv"
    fields = lines[120].split(",")
    fields[2] = '"teleport"'  # an unknown behaviour on line 121
    bad_value.write_text("\n".join([*lines[:120], ",".join(fields), *lines[121:]]) + "\n")
    bad_shape.write_text("\n".join([*lines[:200], "u1,2024-01-01", *lines[200:]]) + "\n")
    for path in (bad_value, bad_shape):
        params = _file_params(path)
        with pytest.raises(InputError) as duck:
            ingest(params, tmp_path / "duck.parquet", tmp_path / "truth")
        with pytest.raises(InputError) as on_spark:
            ingest_spark(params, tmp_path / "spark.parquet", tmp_path / "truth", spark=spark)
        assert str(on_spark.value) == str(duck.value)
        assert on_spark.value.row == (121 if path == bad_value else 201)
        assert not (tmp_path / "spark.parquet").exists()


# --- validation ------------------------------------------------------------------------------------

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def dirty_events(tabular_log, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Canonical events (every behaviour) with bad rows planted among them: an unknown behaviour, a
    negative amount, money on a view, a control character in a user id, times before 1970 and in the
    future, too many items, and identical twins."""
    table = pq.read_table(tabular_log["parquet"]).slice(0, 1500)
    rows = table.to_pylist()
    base = rows[10]
    planted = [
        {**base, "behavior": "teleport"},
        {**base, "behavior": PURCHASE, "amount": -5.0},
        {**base, "behavior": "view", "amount": 3.0},
        {**base, "user_id": "bad\x1fid"},
        {**base, "ts": dt.datetime(1969, 12, 31, tzinfo=dt.UTC)},
        {**base, "ts": dt.datetime(2100, 1, 1, tzinfo=dt.UTC)},
        {**base, "quantity": 1e12},
        rows[20], rows[20], rows[300],
    ]
    for offset, row in enumerate(planted):
        rows.insert(50 + 97 * offset, row)
    path = tmp_path_factory.mktemp("dirty") / "events.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=EVENTS_SCHEMA), path)
    return path


def _validate_both(spark, events: Path, cfg: ValidateParams, tmp_path: Path):  # noqa: F811
    """Run the stage on both engines: the same summary.json (verdict, failed expectations with their
    example rows, quarantine counts and reasons), the same error message, Data Docs on both."""
    summaries, errors = {}, {}
    for engine in ("duckdb", "spark"):
        folder = tmp_path / engine
        kwargs = {"out": folder / "validated.parquet", "quarantine_out": folder / "quarantine.parquet",
                  "report_dir": folder / "report", "now": NOW}
        try:
            if engine == "spark":
                validate_file_spark(events, cfg, DEFAULT_BEHAVIORS, spark=spark, **kwargs)
            else:
                validate_file(events, cfg, DEFAULT_BEHAVIORS, **kwargs)
        except ValidationFailed as failed:
            errors[engine] = str(failed).replace(str(folder), "<report>")
        summaries[engine] = json.loads((folder / "report" / "summary.json").read_text())
        assert (folder / "report" / "data_docs" / "index.html").is_file()
    assert errors.get("spark") == errors.get("duckdb")
    assert summaries["spark"] == summaries["duckdb"]
    return summaries["duckdb"], errors.get("duckdb")


def test_quarantine_verdict_and_rows_equal_on_both_engines(spark, dirty_events, tmp_path: Path) -> None:  # noqa: F811
    cfg = ValidateParams(mode="quarantine", max_duplicate_share=0.01, max_quarantine_share=0.1)
    summary, error = _validate_both(spark, dirty_events, cfg, tmp_path)
    assert error is None and summary["success"]
    assert summary["rows_quarantined"] == 7 and sum(summary["quarantine_reasons"].values()) == 7
    for name in ("validated.parquet", "quarantine.parquet"):
        duck, spark_table = pq.read_table(tmp_path / "duckdb" / name), pq.read_table(tmp_path / "spark" / name)
        assert spark_table.schema.equals(duck.schema), name
        assert spark_table.equals(duck), name
    reasons = pq.read_table(tmp_path / "spark" / "quarantine.parquet").column("reason").to_pylist()
    assert "expect_column_values_to_be_in_set(behavior)" in reasons


def test_failures_equal_on_both_engines(spark, dirty_events, tmp_path: Path) -> None:  # noqa: F811
    # mode fail: every row-level expectation fails with its examples; twins break the uniqueness share.
    summary, error = _validate_both(spark, dirty_events, ValidateParams(mode="fail", max_duplicate_share=0.0),
                                    tmp_path / "fail")
    assert not summary["success"] and error is not None
    failed = [f["expectation"] for f in summary["failed_expectations"]]
    assert len(failed) == 7 and any(f.startswith("expect_compound_columns_to_be_unique") for f in failed)
    assert all(f["examples"] for f in summary["failed_expectations"])  # example rows, the same on both
