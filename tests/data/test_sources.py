"""Every source becomes the canonical table: typed, sorted by user and time, values as documented."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from uservalue.cli.app import app
from uservalue.config import DataParams, FileSource, TaobaoSource
from uservalue.schema import EVENTS_SCHEMA
from uservalue.data.sources import ingest


def _assert_canonical_and_sorted(path: Path) -> pd.DataFrame:
    table = pq.read_table(path)
    assert [(f.name, f.type) for f in table.schema] == [(f.name, f.type) for f in EVENTS_SCHEMA]
    frame = table.to_pandas()
    keys = list(zip(frame["user_id"], frame["ts"], strict=True))
    assert keys == sorted(keys), "events must be sorted by user, then time"
    return frame


def test_cdnow_is_the_real_master_log(cdnow_events: Path) -> None:
    frame = _assert_canonical_and_sorted(cdnow_events)
    assert len(frame) == 69_659
    assert frame["user_id"].nunique() == 23_570
    assert set(frame["behavior"]) == {"buy"}
    assert frame["ts"].min() == pd.Timestamp("1997-01-01", tz="UTC")
    assert frame["ts"].max() < pd.Timestamp("1998-07-01", tz="UTC")
    assert (frame["amount"] == 0).sum() == 80  # the log's real $0 transactions
    first = frame.iloc[0]
    assert (first["user_id"], first["quantity"], first["amount"]) == ("00001", 1.0, 11.77)
    truth = json.loads((cdnow_events.parent / "truth" / "truth.json").read_text())
    assert truth == {"source": "cdnow", "planted": False}


def test_taobao_sample_maps_behaviours_and_keeps_out_of_range_rows(
    taobao_events: Path, taobao_sample: Path
) -> None:
    frame = _assert_canonical_and_sorted(taobao_events)
    raw = pd.read_csv(taobao_sample, header=None, names=["u", "i", "c", "b", "t"], dtype=str)
    assert len(frame) == len(raw)
    expected = raw["b"].map({"pv": "view", "fav": "fav", "cart": "cart", "buy": "buy"}).value_counts()
    assert frame["behavior"].value_counts().sort_index().equals(expected.sort_index().rename("count"))
    # Ingest does not judge: dirt outside the documented range is still here for the gate to count.
    assert frame["ts"].min() < pd.Timestamp("2017-11-24T16:00:00Z")
    buys = frame[frame["behavior"] == "buy"]
    assert (buys["amount"] == 1.0).all() and (frame.loc[frame["behavior"] != "buy", "amount"] == 0).all()
    assert (frame["quantity"] == 1.0).all()


def test_taobao_purchase_value_per_category(tmp_path: Path, taobao_sample: Path) -> None:
    raw = pd.read_csv(taobao_sample, header=None, names=["u", "i", "c", "b", "t"], dtype=str)
    bought_category = raw.loc[raw["b"] == "buy", "c"].iloc[0]
    table = tmp_path / "values.csv"
    table.write_text(f"category_id,amount\n{bought_category},42.5\n")
    params = DataParams(
        source="taobao", path=str(taobao_sample),
        taobao=TaobaoSource(purchase_amount=3.0, category_amount_table=str(table)),
    )
    ingest(params, tmp_path / "events.parquet", tmp_path / "truth")
    buys = pd.read_parquet(tmp_path / "events.parquet").query("behavior == 'buy'")
    assert set(buys.loc[buys["category_id"] == bought_category, "amount"]) == {42.5}
    assert set(buys.loc[buys["category_id"] != bought_category, "amount"]) == {3.0}


def _user_file_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer": ["b", "a", "a", "b"],
            "when": ["2024-03-02 10:00", "2024-03-01 09:30", "2024-03-01 08:00", "2024-03-01 12:00"],
            "action": ["purchase", "click", "purchase", "basket"],
            "sku": ["s1", "s2", "s3", "s4"],
            "price": [9.5, 0.0, 20.0, 0.0],
        }
    )


FILE_SOURCE = FileSource(
    columns={"user_id": "customer", "ts": "when", "behavior": "action", "item_id": "sku",
             "category_id": None, "quantity": None, "amount": "price"},
    behaviors={"click": "view", "basket": "cart", "purchase": "buy"},
    ts_format="%Y-%m-%d %H:%M",
)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_file_source_with_column_and_behaviour_mapping(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"mine.{fmt}"
    frame = _user_file_frame()
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    ingest(DataParams(source="file", path=str(path), file=FILE_SOURCE), tmp_path / "e.parquet", tmp_path / "t")
    events = _assert_canonical_and_sorted(tmp_path / "e.parquet")
    assert list(events["user_id"]) == ["a", "a", "b", "b"]
    assert list(events["behavior"]) == ["buy", "view", "cart", "buy"]
    assert list(events["amount"]) == [20.0, 0.0, 0.0, 9.5]
    assert events["ts"].iloc[0] == pd.Timestamp("2024-03-01 08:00", tz="UTC")
    assert events["category_id"].isna().all() and (events["quantity"] == 1.0).all()


def test_file_source_parquet_with_native_timestamps_and_unix_csv(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {"user_id": [1, 2], "ts": pd.to_datetime(["2024-01-01 00:00", "2024-01-02 00:00"]),
         "behavior": ["view", "buy"], "amount": [0.0, 5.0]}
    )
    frame.to_parquet(tmp_path / "native.parquet")
    source = FileSource(columns={"user_id": "user_id", "ts": "ts", "behavior": "behavior", "amount": "amount"})
    ingest(DataParams(source="file", path=str(tmp_path / "native.parquet"), file=source),
           tmp_path / "a.parquet", tmp_path / "t")
    events = pd.read_parquet(tmp_path / "a.parquet")
    assert list(events["user_id"]) == ["1", "2"]  # ids are strings in the canonical table
    assert events["ts"].iloc[1] == pd.Timestamp("2024-01-02", tz="UTC")

    (tmp_path / "unix.csv").write_text("user_id,ts,behavior\nx,1700000000,view\nx,1700000060,buy\n")
    unix = FileSource(columns={"user_id": "user_id", "ts": "ts", "behavior": "behavior"},
                      ts_format="unix_s", purchase_amount=2.0)
    ingest(DataParams(source="file", path=str(tmp_path / "unix.csv"), file=unix), tmp_path / "b.parquet",
           tmp_path / "t")
    events = pd.read_parquet(tmp_path / "b.parquet")
    assert events["ts"].iloc[0] == pd.Timestamp(1_700_000_000, unit="s", tz="UTC")
    assert list(events["amount"]) == [0.0, 2.0]


def test_cli_ingest_overrides_source(tmp_path: Path, write_params, taobao_sample: Path) -> None:
    params = write_params()
    out = tmp_path / "events.parquet"
    result = CliRunner().invoke(
        app, ["ingest", "--params", str(params), "--source", "taobao", "--path", str(taobao_sample),
              "--out", str(out), "--truth-dir", str(tmp_path / "truth")],
    )
    assert result.exit_code == 0, result.output
    assert pq.read_metadata(out).num_rows == len(taobao_sample.read_text().splitlines())


def test_generated_taobao_file_round_trips(tmp_path: Path, small_synthetic) -> None:
    """A generated log written in the Taobao format ingests back to the same events."""
    from uservalue.data.sources.taobao import export_taobao_csv

    events, _ = small_synthetic
    csv = tmp_path / "UserBehavior.csv"
    rows = export_taobao_csv(events, csv)
    first = csv.read_text().splitlines()[0].split(",")
    assert len(first) == 5 and first[3] in {"pv", "fav", "cart", "buy"} and first[4].isdigit()
    ingest(DataParams(source="taobao", path=str(csv), taobao=TaobaoSource(purchase_amount=2.5)),
           tmp_path / "back.parquet", tmp_path / "truth")
    original, back = pd.read_parquet(events), _assert_canonical_and_sorted(tmp_path / "back.parquet")
    assert len(back) == rows == len(original)
    columns = ["user_id", "ts", "behavior", "item_id", "category_id"]
    pd.testing.assert_frame_equal(back[columns], original[columns])  # synthetic time is whole seconds
    assert set(back.loc[back["behavior"] == "buy", "amount"]) == {2.5}
