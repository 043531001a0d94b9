"""Transaction logs (issue 17 §1): a purchase-only order export in the UCI Online Retail layout, with
guest lines, returns (negative quantities and "C" invoices), ids a spreadsheet wrote as floats and a
day-first date format, goes through ingest -> validate -> featurize: every customer is kept, guests
are dropped, counted and written to the rejects file, returns become `return` events, and the value
label is net spend. The return features are the same in DuckDB, the pandas reference, the online
engine and Spark. The files are generated here; nothing is mocked."""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError

from tests.data.test_features_reference import assert_same_features
from tests.data.test_online_features import assert_same_table as assert_same_online
from tests.support.reference_features import build_features_pandas
from uservalue.config import DataParams, ValidateParams
from uservalue.data.sources import ingest
from uservalue.data.sources.tabular import MISSING_USER
from uservalue.data.validation import run_validation, validate_file
from uservalue.errors import InputError
from uservalue.features.online import event_columns, online_features
from uservalue.features.sql import FeatureSpec, build_features

LAYOUT = ["Invoice", "StockCode", "Description", "Quantity", "InvoiceDate", "Price", "Customer ID", "Country"]
DATE_FORMAT = "%d/%m/%Y %H:%M"  # day first, as the UCI export writes it
CUTOFF = dt.datetime(2011, 1, 1, tzinfo=dt.UTC)
LABEL_END = dt.datetime(2011, 4, 1, tzinfo=dt.UTC)
BEHAVIORS = ("buy", "return")
SPEC = FeatureSpec(behaviors=BEHAVIORS, windows_days=(7, 30))


@dataclass(frozen=True)
class Line:
    invoice: str
    item: str
    quantity: int
    when: dt.datetime
    price: float
    customer: str  # as the export writes it: "17850.0", "17850" or "" (a guest)


def _t(day: int, month: int, year: int, hour: int = 10) -> dt.datetime:
    return dt.datetime(year, month, day, hour, 30, tzinfo=dt.UTC)


LINES = [
    # 17850: written as a float and as an integer; buys before and in the horizon, returns one line.
    Line("536365", "85123A", 6, _t(1, 12, 2010), 2.55, "17850.0"),
    Line("536366", "71053", 2, _t(13, 12, 2010), 3.39, "17850"),
    Line("536367", "22086", 3, _t(25, 12, 2010), 2.0, "17850.0"),
    Line("540001", "84879", 10, _t(15, 1, 2011), 1.69, "17850"),
    Line("540002", "84879", -4, _t(20, 2, 2011), 1.69, "17850.0"),  # a return by its negative quantity
    # 14527: a cancellation before the cutoff (C invoice, negative quantity), one in the horizon
    # marked only by its invoice (positive quantity: a return by the prefix alone).
    Line("536370", "22728", 24, _t(2, 12, 2010), 3.75, "14527.0"),
    Line("C536379", "22728", -12, _t(9, 12, 2010), 3.75, "14527.0"),
    Line("541000", "21730", 5, _t(3, 2, 2011), 4.25, "14527"),
    Line("C541010", "21730", 2, _t(4, 2, 2011), 4.25, "14527"),
    # 13047: returns more in the horizon than it buys there: net spend is floored at 0.
    Line("536380", "22745", 20, _t(5, 12, 2010), 2.1, "13047"),
    Line("C541200", "22745", -20, _t(10, 1, 2011), 2.1, "13047"),
    Line("541201", "22748", 1, _t(11, 1, 2011), 2.1, "13047"),
    # 12583: buys before the cutoff only: kept, with a label of 0.
    Line("536390", "22326", 24, _t(28, 11, 2010), 2.95, "12583.0"),
    # Guests: no customer id, before and in the horizon.
    Line("536400", "22633", 6, _t(1, 12, 2010), 1.85, ""),
    Line("541300", "22633", -1, _t(2, 2, 2011), 1.85, ""),
]
GUESTS = [i for i, line in enumerate(LINES) if not line.customer]


def _user(line: Line) -> str:
    return line.customer.removesuffix(".0")


def _is_return(line: Line) -> bool:
    return line.quantity < 0 or line.invoice.startswith("C")


def _money(line: Line) -> float:
    return abs(line.quantity * line.price)


def expected_net_spend() -> dict[str, float]:
    """Per customer with history before the cutoff: purchases minus returns in the horizon, >= 0."""
    users = {_user(x) for x in LINES if x.customer and x.when < CUTOFF}
    net = dict.fromkeys(users, 0.0)
    for x in LINES:
        if x.customer and _user(x) in users and CUTOFF <= x.when < LABEL_END:
            net[_user(x)] += -_money(x) if _is_return(x) else _money(x)
    return {user: max(value, 0.0) for user, value in net.items()}


def write_retail_csv(path: Path, lines: list[Line] = LINES) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LAYOUT)
        for x in lines:
            writer.writerow([x.invoice, x.item, "SOME ITEM", x.quantity, x.when.strftime(DATE_FORMAT), x.price,
                             x.customer, "United Kingdom"])
    return path


def retail_file_params() -> dict:
    """The data.file section for the Online Retail layout, as a user writes it in params.yaml."""
    return {
        "columns": {"user_id": "Customer ID", "ts": "InvoiceDate", "behavior": None, "item_id": "StockCode",
                    "category_id": None, "quantity": "Quantity", "amount": None, "unit_price": "Price"},
        "default_behavior": "buy",
        "missing_user": "drop",
        "returns": {"column": "Invoice", "prefix": "C"},
        "ts_format": DATE_FORMAT,
    }


def _data_params(path: Path, **file_overrides: object) -> DataParams:
    return DataParams(source="file", path=str(path), behaviors=BEHAVIORS,
                      file={**retail_file_params(), **file_overrides})


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    root = tmp_path_factory.mktemp("retail")
    source = write_retail_csv(root / "online_retail.csv")
    out = root / "data" / "events.parquet"
    result = ingest(_data_params(source), out, root / "data" / "truth", root / "data" / "rejects.csv")
    return root, out, result


def test_ingest_keeps_customers_merges_float_ids_and_drops_guests_to_the_rejects(ingested) -> None:
    root, out, result = ingested
    events = pq.read_table(out).to_pandas()
    assert result.events == len(events) == len(LINES) - len(GUESTS)
    # "17850.0" and "17850" are one customer; every customer is there, no guest.
    assert set(events["user_id"]) == {_user(x) for x in LINES if x.customer}
    # Guests: counted in the summary, and in the rejects file with their row (header = row 1) and reason.
    assert result.rejected == {MISSING_USER: len(GUESTS)}
    assert result.summary()["rejected"] == len(GUESTS)
    rejects = pd.read_csv(root / "data" / "rejects.csv", dtype=str)
    assert rejects["row"].astype(int).tolist() == [i + 2 for i in GUESTS]
    assert (rejects["reason"] == MISSING_USER).all()
    assert rejects["Invoice"].tolist() == [LINES[i].invoice for i in GUESTS]


def test_returns_carry_the_positive_amount_and_quantity_given_back(ingested) -> None:
    _, out, _ = ingested
    events = pq.read_table(out).to_pandas().sort_values(["ts", "user_id"]).reset_index(drop=True)
    kept = sorted((x for x in LINES if x.customer), key=lambda x: (x.when, _user(x)))
    assert events["behavior"].tolist() == ["return" if _is_return(x) else "buy" for x in kept]
    assert events["quantity"].tolist() == [float(abs(x.quantity)) for x in kept]
    assert events["amount"].tolist() == pytest.approx([_money(x) for x in kept])
    assert (events["amount"] >= 0).all() and (events["quantity"] >= 0).all()
    # The day-first dates are read as such (25/12, not an error; 01/12 is December, not January).
    assert events["ts"].min() == pd.Timestamp(_t(28, 11, 2010))


def test_validate_and_featurize_give_net_spend_per_customer(ingested, tmp_path: Path) -> None:
    _, out, _ = ingested
    outcome = validate_file(out, ValidateParams(ts_min=dt.date(2010, 1, 1), ts_max=dt.date(2012, 1, 1)), BEHAVIORS,
                            out=tmp_path / "validated.parquet", quarantine_out=tmp_path / "q.parquet",
                            report_dir=tmp_path / "validation")
    assert len(outcome.clean) == outcome.rows == pq.read_metadata(out).num_rows  # returns pass the gate
    features = build_features(tmp_path / "validated.parquet", CUTOFF, SPEC, label_end=LABEL_END).to_pandas()
    net = expected_net_spend()
    assert features["user_id"].tolist() == sorted(net)
    assert dict(zip(features["user_id"], features["value"], strict=True)) == pytest.approx(net)
    assert net["13047"] == 0.0 and net["12583"] == 0.0 and net["17850"] > 0  # the floor and a buyer only before
    by_user = features.set_index("user_id")
    before = [x for x in LINES if x.customer and x.when < CUTOFF]
    for user in net:
        returned = [x for x in before if _user(x) == user and _is_return(x)]
        bought = [x for x in before if _user(x) == user and not _is_return(x)]
        assert by_user.loc[user, "return_count"] == len(returned)
        assert by_user.loc[user, "return_amount_sum"] == pytest.approx(sum(map(_money, returned)))
        assert by_user.loc[user, "monetary_sum"] == pytest.approx(sum(map(_money, bought)))
    assert by_user.loc["14527", "return_count_30d"] == 1  # the C invoice of 9/12 is within 30 days of 1/1
    # n_purchases counts purchases in the horizon, returns not.
    assert by_user.loc["13047", "n_purchases"] == 1 and bool(by_user.loc["13047", "bought"])


def test_gate_allows_money_on_returns_only_besides_purchases() -> None:
    """With `return` a behaviour, an amount on a return passes the gate and one on a view does not."""
    when = pd.Timestamp(CUTOFF)
    frame = pd.DataFrame({"user_id": ["a", "a", "b", "b"], "ts": [when] * 4,
                          "behavior": ["buy", "return", "view", "buy"], "item_id": [None] * 4,
                          "category_id": [None] * 4, "quantity": [1.0] * 4, "amount": [5.0, 2.0, 3.0, 1.0]})
    cfg = ValidateParams(ts_min=dt.date(2010, 1, 1), ts_max=dt.date(2012, 1, 1), mode="quarantine",
                         max_quarantine_share=0.5)
    outcome = run_validation(frame, cfg, ("view", *BEHAVIORS))
    assert outcome.quarantined["behavior"].tolist() == ["view"]
    assert sorted(outcome.clean["behavior"]) == ["buy", "buy", "return"]


def test_return_features_agree_across_duckdb_reference_and_online(ingested) -> None:
    _, out, _ = ingested
    table = pq.read_table(out)
    for cutoff in (CUTOFF, dt.datetime(2011, 2, 10, tzinfo=dt.UTC)):
        duck = build_features(table, cutoff, SPEC, label_end=LABEL_END).to_pandas()
        duck["cutoff"] = duck["cutoff"].dt.tz_convert("UTC")
        assert_same_features(duck, build_features_pandas(table.to_pandas(), cutoff, SPEC, label_end=LABEL_END))
        assert_same_online(online_features(event_columns(table), cutoff, SPEC), build_features(table, cutoff, SPEC))
    assert (duck["return_count"] > 0).any() and (duck["return_amount_sum_30d"] > 0).any()


def test_default_spec_has_no_return_columns() -> None:
    """Logs without returns (CDNOW, Taobao, synthetic: data.behaviors without `return`) keep their columns."""
    assert not any(c.startswith("return_") for c in FeatureSpec().aggregate_columns())
    assert [c for c in SPEC.aggregate_columns() if c.startswith("return_")] == [
        "return_count", "return_count_7d", "return_count_30d", "return_recency_days",
        "return_amount_sum", "return_amount_sum_7d", "return_amount_sum_30d"]


def test_parquet_export_with_float_ids_and_guests(tmp_path: Path) -> None:
    """The same lines as a Parquet file whose Customer ID column is float64 (NaN for guests)."""
    frame = pd.DataFrame({
        "Invoice": [x.invoice for x in LINES], "StockCode": [x.item for x in LINES],
        "Quantity": [x.quantity for x in LINES], "InvoiceDate": [x.when.strftime(DATE_FORMAT) for x in LINES],
        "Price": [x.price for x in LINES],
        "Customer ID": [float(x.customer) if x.customer else None for x in LINES],
    })
    source = tmp_path / "online_retail.parquet"
    # NaN, not null, for the guests (as a float column from a spreadsheet holds them).
    pq.write_table(pa.table({c: pa.array(frame[c].to_numpy(), from_pandas=False) for c in frame.columns}), source)
    ids = pq.read_table(source).column("Customer ID")
    assert ids.type == pa.float64() and ids.null_count == 0 and pc.sum(pc.is_nan(ids)).as_py() == len(GUESTS)
    result = ingest(_data_params(source), tmp_path / "events.parquet", tmp_path / "truth", tmp_path / "rejects.csv")
    events = pq.read_table(tmp_path / "events.parquet").to_pandas()
    assert set(events["user_id"]) == {_user(x) for x in LINES if x.customer}
    assert result.rejected == {MISSING_USER: len(GUESTS)}
    assert (events["behavior"] == "return").sum() == sum(_is_return(x) for x in LINES if x.customer)


def test_guest_line_is_an_error_unless_dropped(tmp_path: Path) -> None:
    source = write_retail_csv(tmp_path / "online_retail.csv")
    with pytest.raises(InputError) as raised:
        ingest(_data_params(source, missing_user="error"), tmp_path / "events.parquet", tmp_path / "truth")
    assert raised.value.row == GUESTS[0] + 2 and raised.value.column == "Customer ID"
    assert not (tmp_path / "events.parquet").exists()


def test_failed_ingest_leaves_the_previous_rejects_and_no_temporary_file(tmp_path: Path) -> None:
    source = write_retail_csv(tmp_path / "online_retail.csv")
    out, rejects = tmp_path / "data" / "events.parquet", tmp_path / "data" / "rejects.csv"
    ingest(_data_params(source), out, tmp_path / "data" / "truth", rejects)
    before = rejects.read_bytes(), out.read_bytes()
    broken = [*LINES, Line("541999", "1", 1, _t(1, 3, 2011), 1.0, "99999")]
    write_retail_csv(source, broken)
    source.write_text(source.read_text().replace("01/03/2011 10:30", "2011-03-01 10:30"))  # not day-first
    with pytest.raises(InputError) as raised:
        ingest(_data_params(source), out, tmp_path / "data" / "truth", rejects)
    assert raised.value.row == len(broken) + 1 and raised.value.column == "InvoiceDate"
    assert (rejects.read_bytes(), out.read_bytes()) == before
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]


def test_negative_line_without_return_behaviour_names_row_and_fix(tmp_path: Path) -> None:
    source = write_retail_csv(tmp_path / "online_retail.csv", [x for x in LINES if x.customer])
    file = {**retail_file_params(), "returns": None}
    with pytest.raises(InputError) as raised:
        ingest(DataParams(source="file", path=str(source), behaviors=("buy",), file=file),
               tmp_path / "events.parquet", tmp_path / "truth")
    negative = next(i for i, x in enumerate(x for x in LINES if x.customer) if x.quantity < 0)
    assert raised.value.row == negative + 2 and raised.value.column == "Quantity"
    assert "add 'return' to data.behaviors" in str(raised.value)
    # Configuring return lines by prefix without the behaviour is a config error naming the fix.
    with pytest.raises(ValidationError, match="add 'return' to data.behaviors"):
        DataParams(source="file", path=str(source), behaviors=("buy",), file=retail_file_params())
    # A purchase-only file needs either a behaviour column or default_behavior.
    with pytest.raises(ValidationError, match="default_behavior"):
        DataParams(source="file", path=str(source), file={**file, "default_behavior": None})


def test_amount_column_wins_over_unit_price(tmp_path: Path) -> None:
    source = tmp_path / "orders.csv"
    source.write_text("customer,when,qty,price,total\nc1,2010-12-01,3,2.0,5.0\nc2,2010-12-02,-2,2.0,-4.0\n")
    columns = {"user_id": "customer", "ts": "when", "behavior": None, "item_id": None, "category_id": None,
               "quantity": "qty", "unit_price": "price"}
    for amount, expected in ((None, [6.0, 4.0]), ("total", [5.0, 4.0])):
        params = DataParams(source="file", path=str(source), behaviors=BEHAVIORS,
                            file={"columns": {**columns, "amount": amount}, "default_behavior": "buy"})
        ingest(params, tmp_path / "events.parquet", tmp_path / "truth")
        events = pq.read_table(tmp_path / "events.parquet").to_pandas()
        assert events["amount"].tolist() == expected and events["behavior"].tolist() == ["buy", "return"]


# --- Spark: the same return features and net spend labels ---------------------------------------------------


@pytest.fixture(scope="module")
def spark() -> Iterator:
    from pyspark.sql import SparkSession

    from tests.data.test_spark_parity import TEST_SPARK
    from uservalue.features.spark import spark_session

    active = SparkSession.getActiveSession()  # test_spark_parity's session, when it runs in this process
    session = active or spark_session(TEST_SPARK, "uservalue-tests")
    yield session
    if active is None:
        session.stop()


@pytest.mark.slow
def test_return_features_and_net_spend_equal_on_spark(spark, ingested, tmp_path: Path) -> None:
    from tests.data.test_spark_parity import assert_same_table
    from uservalue.features.spark import feature_table, register_spark_events, spark_features

    _, out, _ = ingested
    duck = build_features(out, CUTOFF, SPEC, label_end=LABEL_END)
    frame = spark_features(spark, register_spark_events(spark, out), CUTOFF, SPEC, label_end=LABEL_END)
    assert_same_table(duck, feature_table(frame, SPEC, tmp_path / "spark", labels=True))
    assert dict(zip(duck.column("user_id").to_pylist(), duck.column("value").to_pylist(), strict=True)) == (
        pytest.approx(expected_net_spend()))


# --- the pipeline: dvc exp run on a temporary project ---------------------------------------------------------


@pytest.mark.slow
def test_dvc_exp_run_reads_an_online_retail_export(tmp_path: Path) -> None:
    """`dvc exp run -S data.source=file -S data.path=... -S data.file...` up to featurize: every customer
    kept, guests dropped and counted, net spend right. (The split is given: auto cutoffs are another
    change's.)"""
    from tests.e2e.conftest import new_project, run_in

    repo = new_project(tmp_path / "project")
    write_retail_csv(repo / "data" / "raw" / "online_retail.csv")
    overrides = {
        "data.source": "file", "data.path": "data/raw/online_retail.csv", "data.behaviors": "[buy,return]",
        "data.file.columns.behavior": "null", "data.file.columns.category_id": "null",
        "data.file.columns.amount": "null", "data.file.columns.user_id": "'Customer ID'",
        "data.file.columns.ts": "InvoiceDate", "data.file.columns.item_id": "StockCode",
        "data.file.columns.quantity": "Quantity", "data.file.columns.unit_price": "Price",
        "data.file.default_behavior": "buy", "data.file.missing_user": "drop",
        "data.file.returns": "{column: Invoice, prefix: C}", "data.file.ts_format": f"'{DATE_FORMAT}'",
        "validate.ts_min": "'2010-01-01'", "validate.ts_max": "'2012-01-01'",
        "validate.min_users": "1", "validate.min_purchases": "1",
        "split.eval_cutoff": f"'{CUTOFF.date()}'", "split.horizon_days": str((LABEL_END - CUTOFF).days),
        "split.train_cutoffs": "['2010-12-20']",
    }
    args = [arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")]
    run_in(repo, "dvc", "exp", "run", *args, "featurize")
    summary = json.loads((repo / "reports" / "ingest.json").read_text())
    assert summary["rejected"] == len(GUESTS) and summary["rejected_by_reason"] == {MISSING_USER: len(GUESTS)}
    assert len(pd.read_csv(repo / "data" / "rejects.csv")) == len(GUESTS)
    evaluation = pd.read_parquet(repo / "data" / "features" / "eval.parquet")
    assert dict(zip(evaluation["user_id"], evaluation["value"], strict=True)) == pytest.approx(expected_net_spend())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["data"]["file"]["returns"] == {"column": "Invoice", "prefix": "C"}  # what the run used


def test_historical_and_btyd_spend_is_net_of_returns_like_the_labels(ingested) -> None:
    """Labels of a returns log are net spend, so the purchase-only baselines read spend net of returns too:
    the run-rate of `historical` and BTYD's per-customer monetary value (never below 0)."""
    from uservalue.models.btyd import rfm_summary
    from uservalue.models.catalog import create_model

    _, out, _ = ingested
    features = build_features(pq.read_table(out), CUTOFF, SPEC).to_pandas()
    model = create_model("historical", {"window_days": 30}, SPEC, horizon_days=90)
    predicted = model.predict(features).set_index("user_id")["expected_value"]
    by_user = features.set_index("user_id")
    net = (by_user["monetary_sum_30d"] - by_user["return_amount_sum_30d"]).clip(lower=0) * 90 / 30
    assert predicted.to_dict() == pytest.approx(net.to_dict())
    assert (by_user["return_amount_sum_30d"] > 0).any(), "the sample must return something in the window"

    summary = rfm_summary(features, time_unit_days=7.0)
    days = features["purchase_days"].clip(lower=1).to_numpy()
    buyer = features["purchase_days"].to_numpy() > 0
    expected = ((features["monetary_sum"] - features["return_amount_sum"]).clip(lower=0).to_numpy() / days)
    assert summary["monetary_value"].to_numpy() == pytest.approx(expected * buyer)
