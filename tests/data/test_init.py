"""`uservalue init --source file`: a shop's order export (the UCI Online Retail layout: unit prices, no
behaviour column, cancellations, guest lines, float customer ids, US dates) is inspected, the proposed
params are written into params.yaml with its comments kept, and the file then goes through ingest,
validate and featurize with the cutoffs derived from it (issue 17 §2)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import random
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import REPO_ROOT
from uservalue.cli.app import app
from uservalue.config import load_params
from uservalue.data.inspection import detect_ts_format, inspect_file, updated_params_text
from uservalue.errors import ConfigError, InputError

HEADER = ["Invoice", "StockCode", "Description", "Quantity", "InvoiceDate", "Price", "Customer ID", "Country"]
START = dt.datetime(2010, 12, 1, 8, 26)


def write_online_retail(path: Path, customers: int = 150, seed: int = 3) -> dict[str, int]:
    """An Online Retail-layout CSV: every customer orders on a few days over a year; one in ten orders is
    later cancelled ('C' invoice, negative quantity); one line in fifteen has no customer (a guest)."""
    rng = random.Random(seed)
    counts = {"lines": 0, "guests": 0, "returns": 0}
    invoice = 536365
    with path.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(HEADER)
        for customer in range(12346, 12346 + customers):
            for _order in range(rng.randint(1, 4)):
                when = START + dt.timedelta(days=rng.randint(0, 370), minutes=rng.randint(0, 600))
                stamp = f"{when.month}/{when.day}/{when.year} {when.hour}:{when.minute:02d}"
                lines = [(f"{rng.randint(20000, 23000)}", rng.randint(1, 12), round(rng.uniform(0.5, 9.5), 2))
                         for _ in range(rng.randint(1, 3))]
                for stock, quantity, price in lines:
                    out.writerow([invoice, stock, "ITEM", quantity, stamp, price, f"{customer}.0", "United Kingdom"])
                    counts["lines"] += 1
                if rng.random() < 0.1:
                    stock, quantity, price = lines[0]
                    later = when + dt.timedelta(days=2)
                    out.writerow([f"C{invoice + 1}", stock, "ITEM", -quantity,
                                  f"{later.month}/{later.day}/{later.year} {later.hour}:{later.minute:02d}", price,
                                  f"{customer}.0", "United Kingdom"])
                    counts["lines"] += 1
                    counts["returns"] += 1
                invoice += 2
                if rng.random() < 0.07:
                    out.writerow([invoice, "85123A", "ITEM", 2, stamp, 2.55, "", "France"])
                    counts["lines"] += 1
                    counts["guests"] += 1
    return counts


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy2(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "data/raw").mkdir(parents=True)
    write_online_retail(tmp_path / "data/raw/orders.csv")
    return tmp_path


def test_the_order_export_is_read_as_a_purchase_log_with_returns_and_guests(project: Path) -> None:
    proposal = inspect_file(project / "data/raw/orders.csv", display_path="data/raw/orders.csv")
    settings = proposal.settings
    assert settings["data.source"] == "file" and settings["data.path"] == "data/raw/orders.csv"
    assert (settings["data.file.format"], settings["data.file.delimiter"], settings["data.file.header"]) == \
        ("csv", ",", True)
    assert settings["data.file.columns"] == {
        "user_id": "Customer ID", "ts": "InvoiceDate", "behavior": None, "item_id": "StockCode",
        "category_id": None, "quantity": "Quantity", "amount": None, "unit_price": "Price"}
    assert settings["data.file.ts_format"] == "%m/%d/%Y %H:%M"
    assert settings["data.file.default_behavior"] == "buy"
    assert settings["data.file.returns"] == {"column": "Invoice", "prefix": "C"}
    assert settings["data.behaviors"] == ["view", "fav", "cart", "buy", "return"]
    assert settings["data.file.missing_user"] == "drop"
    # The window covers every line of the file (read whole, not only the sample), a day either side.
    assert settings["validate.ts_min"] == "2010-11-30T00:00:00Z"
    assert settings["validate.ts_max"] > "2011-12-0" and settings["validate.ts_max"] < "2011-12-10"
    assert any("guests" in note for note in proposal.notes)


def test_time_layouts_are_recognised() -> None:
    import pandas as pd

    assert detect_ts_format(pd.Series(["2011-01-02 10:00:00", "2011-01-03T11:00:00Z"])) == ("iso", None)
    assert detect_ts_format(pd.Series(["1511544070", "1511544071"])) == ("unix_s", None)
    assert detect_ts_format(pd.Series(["1511544070000"])) == ("unix_ms", None)
    assert detect_ts_format(pd.Series(["25/12/2010 10:00", "13/1/2011 9:05"]))[0] == "%d/%m/%Y %H:%M"
    chosen, note = detect_ts_format(pd.Series(["1/2/2011 10:00", "3/4/2011 9:05"]))
    assert chosen == "%m/%d/%Y %H:%M" and "ambiguous" in note and "%d/%m/%Y %H:%M" in note
    with pytest.raises(ValueError, match="no known layout.*'yesterday'"):
        detect_ts_format(pd.Series(["yesterday"]))


def test_init_writes_params_keeping_every_comment(project: Path) -> None:
    before = (project / "params.yaml").read_text()
    runner = CliRunner()
    shown = runner.invoke(app, ["init", "--source", "file", "--path", "data/raw/orders.csv", "--params",
                                str(project / "params.yaml"), "--dry-run"])
    assert shown.exit_code == 0, shown.output
    assert (project / "params.yaml").read_text() == before  # a dry run only prints
    assert yaml.safe_load(shown.stdout)["data.file.columns"]["unit_price"] == "Price"

    done = runner.invoke(app, ["init", "--source", "file", "--path", "data/raw/orders.csv", "--params",
                               str(project / "params.yaml")])
    assert done.exit_code == 0, done.output
    after = (project / "params.yaml").read_text()
    comments = [line.split("#", 1)[1] for line in before.splitlines() if "#" in line]
    assert all(comment in after for comment in comments)  # comments and their order stay
    changed = [a for a, b in zip(after.splitlines(), before.splitlines(), strict=True) if a != b]
    assert len(after.splitlines()) == len(before.splitlines()) and len(changed) <= 20
    assert [line for line in after.splitlines() if line.startswith("split:")] == \
        [line for line in before.splitlines() if line.startswith("split:")]
    params = load_params(project / "params.yaml")
    assert params.data.source == "file" and params.data.file.columns["unit_price"] == "Price"
    assert params.data.file.ts_format == "%m/%d/%Y %H:%M" and params.split.eval_cutoff == "auto"


def test_init_names_what_it_cannot_tell(tmp_path: Path) -> None:
    odd = tmp_path / "odd.csv"
    odd.write_text("a,b,c\n1,2,3\n4,5,6\n")
    with pytest.raises(InputError, match=r"odd.csv.*cannot tell which column is the customer id among \['a', 'b', 'c'\]"
                                         r".*--column user_id="):
        inspect_file(odd)
    with pytest.raises(ConfigError, match=r"--column user_id=nope: .* has no such column"):
        inspect_file(odd, overrides={"user_id": "nope"})
    with pytest.raises(InputError, match=r"column 'c'.*no known layout"):
        inspect_file(odd, overrides={"user_id": "a", "ts": "c"})
    missing = CliRunner().invoke(app, ["init", "--source", "file", "--path", str(tmp_path / "none.csv"),
                                       "--params", str(tmp_path / "params.yaml"), "--dry-run"])
    assert missing.exit_code == 2 and "none.csv: file does not exist" in missing.output
    with pytest.raises(ConfigError, match="no section 'nope'"):
        updated_params_text("data: {source: cdnow}\n", {"nope.key": 1})


@pytest.mark.slow
def test_the_inspected_file_goes_through_ingest_validate_and_featurize(project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project)
    runner = CliRunner()
    for args in (["init", "--source", "file", "--path", "data/raw/orders.csv"], ["ingest"], ["validate"],
                 ["featurize", "--split-out", "reports/split.json"]):
        done = runner.invoke(app, args)
        assert done.exit_code == 0, (args, done.output)
    split = json.loads((project / "reports/split.json").read_text())
    assert split["origin"] == {"eval_cutoff": "log", "horizon_days": "log", "train_cutoffs": "log"}
    assert split["data_source"] == "file" and len(split["train_cutoffs"]) == 2
    end = dt.datetime.fromisoformat(split["log"]["last_event"]).date() + dt.timedelta(days=1)
    assert dt.datetime.fromisoformat(split["eval_cutoff"]).date() == end - dt.timedelta(days=split["horizon_days"])
