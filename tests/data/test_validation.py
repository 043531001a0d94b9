"""The Great Expectations gate on real data, each expectation on its own, and quarantine mode."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from uservalue.cli.app import app
from uservalue.config import ValidateParams
from uservalue.errors import ValidationFailed
from uservalue.data.validation import run_validation, validate_file

BEHAVIORS = ("view", "fav", "cart", "buy")
# The Taobao log's documented days are Beijing time (UTC+8).
TAOBAO_WINDOW = {"ts_min": dt.datetime(2017, 11, 24, 16, tzinfo=dt.UTC),
                 "ts_max": dt.datetime(2017, 12, 3, 16, tzinfo=dt.UTC)}
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _outputs(tmp_path: Path) -> dict[str, Path]:
    return {"out": tmp_path / "validated.parquet", "quarantine_out": tmp_path / "quarantine.parquet",
            "report_dir": tmp_path / "reports" / "validation"}


def test_cdnow_passes_and_writes_report_and_data_docs(cdnow_events: Path, tmp_path: Path) -> None:
    cfg = ValidateParams(ts_min=dt.date(1997, 1, 1), ts_max=dt.date(1998, 7, 1), min_users=20_000,
                         min_purchases=60_000)
    paths = _outputs(tmp_path)
    outcome = validate_file(cdnow_events, cfg, BEHAVIORS, **paths)
    assert outcome.success and not outcome.failed
    assert len(pd.read_parquet(paths["out"])) == 69_659
    assert len(pd.read_parquet(paths["quarantine_out"])) == 0
    summary = json.loads((paths["report_dir"] / "summary.json").read_text())
    assert summary["success"] and summary["rows_valid"] == 69_659 and summary["expectations_evaluated"] >= 15
    result = json.loads((paths["report_dir"] / "result.json").read_text())
    assert result["success"] and result["suite_name"] == "canonical_events"
    assert "<html" in (paths["report_dir"] / "data_docs" / "index.html").read_text().lower()


def _outside_window(events: Path) -> pd.DataFrame:
    frame = pd.read_parquet(events)
    lo, hi = (pd.Timestamp(v) for v in TAOBAO_WINDOW.values())
    return frame[(frame["ts"] < lo) | (frame["ts"] >= hi)]


def test_taobao_dirt_fails_the_gate_and_leaves_good_outputs_untouched(taobao_events: Path, tmp_path) -> None:
    paths = _outputs(tmp_path)
    paths["out"].write_bytes(b"last good validated events")
    paths["quarantine_out"].write_bytes(b"last good quarantine")
    with pytest.raises(ValidationFailed) as raised:
        validate_file(taobao_events, ValidateParams(**TAOBAO_WINDOW), BEHAVIORS, **paths)
    message = str(raised.value)
    bad = _outside_window(taobao_events)
    assert "expect_column_values_to_be_between(ts)" in message and f"{len(bad)} rows" in message
    assert "e.g. {'row':" in message  # example rows are printed
    assert paths["out"].read_bytes() == b"last good validated events"
    assert paths["quarantine_out"].read_bytes() == b"last good quarantine"
    summary = json.loads((paths["report_dir"] / "summary.json").read_text())
    assert summary["success"] is False
    assert summary["failed_expectations"][0]["unexpected_count"] == len(bad)
    assert (paths["report_dir"] / "data_docs" / "index.html").is_file()


def test_taobao_quarantine_counts_every_out_of_range_row(taobao_events: Path, tmp_path: Path) -> None:
    paths = _outputs(tmp_path)
    cfg = ValidateParams(mode="quarantine", max_quarantine_share=0.05, **TAOBAO_WINDOW)
    outcome = validate_file(taobao_events, cfg, BEHAVIORS, **paths)
    expected = _outside_window(taobao_events)
    assert len(expected) >= 1  # the sample's dirt (the real one has a 2017-09-11 event)
    quarantined = pd.read_parquet(paths["quarantine_out"])
    assert len(quarantined) == len(expected)
    assert set(zip(quarantined["user_id"], quarantined["ts"], strict=True)) == set(
        zip(expected["user_id"], expected["ts"], strict=True)
    )
    assert quarantined["reason"].str.contains("expect_column_values_to_be_between\\(ts\\)").all()
    validated = pd.read_parquet(paths["out"])
    assert len(validated) + len(quarantined) == pq_rows(taobao_events)
    summary = json.loads((paths["report_dir"] / "summary.json").read_text())
    assert summary["rows_quarantined"] == len(expected) and summary["success"]
    assert summary["quarantine_reasons"] == {"expect_column_values_to_be_between(ts)": len(expected)}
    assert outcome.quarantine_share == pytest.approx(len(expected) / pq_rows(taobao_events))


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def test_quarantine_fails_above_its_share(taobao_events: Path, tmp_path: Path) -> None:
    cfg = ValidateParams(mode="quarantine", max_quarantine_share=0.0001, **TAOBAO_WINDOW)
    with pytest.raises(ValidationFailed, match="quarantine share"):
        validate_file(taobao_events, cfg, BEHAVIORS, **_outputs(tmp_path))


@pytest.fixture(scope="module")
def clean_frame(taobao_events: Path) -> pd.DataFrame:
    frame = pd.read_parquet(taobao_events)
    lo, hi = (pd.Timestamp(v) for v in TAOBAO_WINDOW.values())
    return frame[(frame["ts"] >= lo) & (frame["ts"] < hi)].reset_index(drop=True)


def _break(frame: pd.DataFrame, how: str) -> pd.DataFrame:
    frame = frame.copy()
    view = frame.index[frame["behavior"] == "view"][3]
    if how == "null_user":
        frame.loc[5, "user_id"] = None
    elif how == "unknown_behavior":
        frame.loc[5, "behavior"] = "click"
    elif how == "negative_amount":
        frame.loc[frame.index[frame["behavior"] == "buy"][0], "amount"] = -1.0
    elif how == "amount_on_view":
        frame.loc[view, "amount"] = 12.0
    elif how == "negative_quantity":
        frame.loc[5, "quantity"] = -2.0
    elif how == "future":
        frame.loc[5, "ts"] = pd.Timestamp("2030-01-01", tz="UTC")
    elif how == "huge_amount":  # above uservalue.limits.AMOUNT_MAX, as the service refuses it
        frame.loc[frame.index[frame["behavior"] == "buy"][0], "amount"] = 1.7e308
    elif how == "control_in_user_id":
        frame.loc[5, "user_id"] = "u\x1f1"
    elif how == "long_user_id":
        frame.loc[5, "user_id"] = "u" * 300
    elif how == "before_1970":
        frame.loc[5, "ts"] = pd.Timestamp("1969-12-31T23:59:59", tz="UTC")
    elif how == "duplicates":
        frame = pd.concat([frame, frame.iloc[:200]], ignore_index=True)
    elif how == "missing_column":
        frame = frame.drop(columns=["quantity"])
    return frame


def test_control_frame_passes(clean_frame) -> None:
    outcome = run_validation(clean_frame, ValidateParams(**TAOBAO_WINDOW), BEHAVIORS, now=NOW)
    assert outcome.success and not outcome.failed


@pytest.mark.parametrize(
    ("how", "cfg", "failed"),
    [
        ("null_user", {}, "expect_column_values_to_not_be_null(user_id)"),
        ("unknown_behavior", {}, "expect_column_values_to_be_in_set(behavior)"),
        ("negative_amount", {}, "expect_column_values_to_be_between(amount)"),
        ("amount_on_view", {}, 'expect_column_values_to_be_between(amount) where behavior!="buy"'),
        ("negative_quantity", {}, "expect_column_values_to_be_between(quantity)"),
        ("future", {"ts_max": None}, "expect_column_values_to_be_between(ts)"),
        ("huge_amount", {}, "expect_column_values_to_be_between(amount)"),
        ("control_in_user_id", {}, "expect_column_values_to_match_regex(user_id)"),
        ("long_user_id", {}, "expect_column_value_lengths_to_be_between(user_id)"),
        ("before_1970", {"ts_min": None}, "expect_column_values_to_be_between(ts)"),
        ("duplicates", {"max_duplicate_share": 0.01}, "expect_compound_columns_to_be_unique"),
        ("missing_column", {}, "expect_column_to_exist(quantity)"),
        ("none", {"min_users": 1000}, "expect_column_unique_value_count_to_be_between(user_id)"),
        ("none", {"min_purchases": 500}, 'expect_table_row_count_to_be_between where behavior=="buy"'),
    ],
)
def test_each_expectation_catches_its_problem(clean_frame, how, cfg, failed) -> None:
    params = ValidateParams(**{**TAOBAO_WINDOW, **cfg})
    outcome = run_validation(_break(clean_frame, how), params, BEHAVIORS, now=NOW)
    assert not outcome.success
    labels = [f.expectation for f in outcome.failed]
    assert any(label.startswith(failed) for label in labels), labels


def test_cli_exits_1_and_names_failures(taobao_events: Path, tmp_path: Path, write_params) -> None:
    params = write_params({"validate.ts_min": "2017-11-24T16:00:00Z", "validate.ts_max": "2017-12-03T16:00:00Z",
                           "validate.min_users": 1, "validate.min_purchases": 1})
    paths = _outputs(tmp_path)
    args = ["validate", "--params", str(params), "--events", str(taobao_events), "--out", str(paths["out"]),
            "--quarantine", str(paths["quarantine_out"]), "--report-dir", str(paths["report_dir"])]
    failed = CliRunner().invoke(app, args)
    assert failed.exit_code == 1
    assert "validation failed" in failed.output and "expect_column_values_to_be_between(ts)" in failed.output
    assert not paths["out"].exists()
    quarantined = CliRunner().invoke(app, [*args, "--mode", "quarantine"])
    assert quarantined.exit_code == 0, quarantined.output
    assert paths["out"].exists() and "quarantined" in quarantined.output
