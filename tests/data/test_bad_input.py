"""Bad input, source by source: a malformed file must stop `uservalue ingest` with exit 2 and ONE
message naming the file, the row and the column (where they apply), and must leave the previous
output exactly as it was (no partial file, no temporary file beside it).

Every bad file is a good one (real CDNOW rows; Taobao-format rows from a generated file, and the real
Taobao sample's where USERVALUE_SAMPLE_DIR names it) with one known cell broken, so the expected row
is exact. Rows count like a spreadsheet: CSV = physical line (a header is line 1), Parquet =
1-based data row.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from uservalue.cli.app import app
from uservalue.errors import InputError
from uservalue.schema import EVENTS_SCHEMA
from uservalue.data.sources.cdnow import cdnow_path, read_cdnow
from uservalue.data.sources.writer import write_sorted_events

from tests.support.samples import missing_sample_reason, real_taobao_sample, write_generated_taobao_csv

REPO_ROOT = Path(__file__).resolve().parents[2]

TAOBAO_COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "unix_ts"]
FILE_COLUMNS = ["user_id", "ts", "behavior", "item_id", "category_id", "quantity", "amount"]
CDNOW_COLUMNS = ["customer_id", "date", "number_of_cds", "dollar_value"]
TB = {name: i for i, name in enumerate(TAOBAO_COLUMNS)}
FC = {name: i for i, name in enumerate(FILE_COLUMNS)}
CD = {name: i for i, name in enumerate(CDNOW_COLUMNS)}

Rows = list[list[str | bytes]]  # a bytes cell is written as-is (to plant bytes that are not UTF-8)
# Writes the input under tmp_path and returns the data.* overrides that point at it.
Writer = Callable[[Path], dict[str, Any]]


# ------------------------------------------------------------------ good rows (real data)


def taobao_rows(csv: Path) -> Rows:
    """The first 20 rows of a Taobao-format file plus its first purchase (so amounts matter)."""
    lines = csv.read_text().splitlines()
    first_buy = next(line for line in lines if line.split(",")[TB["behavior_type"]] == "buy")
    return [line.split(",") for line in [*lines[:20], first_buy]]


def generated_taobao_rows() -> Rows:
    # The cases below are built at collection, from a generated file (always there); the real sample's
    # rows are ingested by test_real_taobao_sample_rows_ingest where USERVALUE_SAMPLE_DIR names it.
    with tempfile.TemporaryDirectory() as folder:
        return taobao_rows(write_generated_taobao_csv(Path(folder)))


def file_rows(taobao: Rows) -> Rows:
    """The same events in the `file` source's layout: ISO time, canonical names, money."""
    rows: Rows = []
    for user, item, category, behavior, ts in taobao:
        when = dt.datetime.fromtimestamp(int(ts), dt.UTC).isoformat()
        bought = behavior == "buy"
        rows.append([user, when, "buy" if bought else "view", item, category, "1",
                     "25.5" if bought else "0"])
    return rows


def cdnow_rows() -> Rows:
    """The first 20 purchases of the real CDNOW master file (carried by the lifetimes wheel)."""
    return [line.split() for line in cdnow_path().read_text().splitlines()[1:21]]


TAOBAO = generated_taobao_rows()
FILE = file_rows(TAOBAO)
CDNOW = cdnow_rows()
AMOUNTS = [  # category_id,amount table; the first category is that of the purchase
    ["category_id", "amount"],
    [TAOBAO[-1][TB["category_id"]], "12.5"],
    ["2520377", "3.0"],
    ["4181361", "7.25"],
]


# ------------------------------------------------------------------ breaking and writing files


def with_cell(rows: Rows, index: int, column: int, value: str | bytes) -> Rows:
    broken = copy.deepcopy(rows)
    broken[index][column] = value
    return broken


def without_cell(rows: Rows, index: int) -> Rows:
    """Row `index` loses its last field."""
    broken = copy.deepcopy(rows)
    broken[index] = broken[index][:-1]
    return broken


def csv_bytes(rows: Rows, delimiter: str = ",", lead: str = "") -> bytes:
    def cell(value: str | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.encode()

    return b"".join(
        lead.encode() + delimiter.encode().join(cell(c) for c in row) + b"\n" for row in rows
    )


def cdnow_bytes(rows: Rows) -> bytes:
    """Whitespace-separated with a header and CRLF endings, like the original file."""
    return csv_bytes([CDNOW_COLUMNS, *rows], delimiter="  ", lead=" ").replace(b"\n", b"\r\n")


def parquet_table(rows: Rows, drop: str | None = None) -> pa.Table:
    columns: dict[str, list[Any]] = {n: [r[i] for r in rows] for i, n in enumerate(FILE_COLUMNS)}
    for numeric in ("quantity", "amount"):
        columns[numeric] = [float(v) for v in columns[numeric]]
    if drop:
        del columns[drop]
    return pa.table(columns)


def taobao(rows: Rows | bytes | None, amounts: Rows | None = None) -> Writer:
    """A headerless Taobao CSV (None: do not write it), optionally with a category amount table."""

    def write(tmp: Path) -> dict[str, Any]:
        path = tmp / "taobao.csv"
        if rows is not None:
            path.write_bytes(rows if isinstance(rows, bytes) else csv_bytes(rows))
        overrides: dict[str, Any] = {"data.source": "taobao", "data.path": str(path)}
        if amounts is not None:
            (tmp / "amounts.csv").write_bytes(csv_bytes(amounts))
            overrides["data.taobao.category_amount_table"] = str(tmp / "amounts.csv")
        return overrides

    return write


def file_csv(
    rows: Rows | bytes | None, header: list[str] = FILE_COLUMNS, delimiter: str = ","
) -> Writer:
    """A user's CSV with a header (None: do not write it)."""

    def write(tmp: Path) -> dict[str, Any]:
        path = tmp / "events.csv"
        if rows is not None:
            content = rows if isinstance(rows, bytes) else csv_bytes([header, *rows], delimiter)
            path.write_bytes(content)
        return {"data.source": "file", "data.path": str(path)}

    return write


def file_parquet(table: pa.Table) -> Writer:
    def write(tmp: Path) -> dict[str, Any]:
        pq.write_table(table, tmp / "events.parquet")
        return {"data.source": "file", "data.path": str(tmp / "events.parquet")}

    return write


# ------------------------------------------------------------------ the matrix


@dataclass(frozen=True)
class Case:
    id: str
    write: Writer
    named: str  # the file the message must name (under tmp_path)
    row: int | None  # None: the message must name no row
    column: str | None  # None: the message must name no column
    says: str = ""  # a phrase the message must also contain


# Headerless Taobao: rows[i] is line i + 1.  CSV with a header: rows[i] is line i + 2.
# Parquet: rows[i] is row i + 1.
CASES = [
    Case("taobao-missing-column", taobao(without_cell(TAOBAO, 6)),
         "taobao.csv", 7, "unix_ts", "4 field(s)"),
    Case("taobao-unparseable-ts", taobao(with_cell(TAOBAO, 4, TB["unix_ts"], "2017-11-25 09:00")),
         "taobao.csv", 5, "unix_ts", "unparseable timestamp"),
    Case("taobao-unknown-behaviour", taobao(with_cell(TAOBAO, 8, TB["behavior_type"], "click")),
         "taobao.csv", 9, "behavior_type", "unknown behaviour"),
    Case("taobao-empty-file", taobao(b""),
         "taobao.csv", None, None, "empty"),
    Case("taobao-wrong-delimiter", taobao(csv_bytes(TAOBAO, delimiter=";")),
         "taobao.csv", 1, None, "delimiter ';'"),
    Case("taobao-non-utf8", taobao(with_cell(TAOBAO, 10, TB["item_id"], b"23\xff45")),
         "taobao.csv", 11, "item_id", "UTF-8"),
    Case("taobao-missing-path", taobao(None),
         "taobao.csv", None, None, "does not exist"),
    Case("taobao-negative-category-amount", taobao(TAOBAO, with_cell(AMOUNTS, 2, 1, "-4")),
         "amounts.csv", 3, "amount", "found '-4'"),
    Case("file-csv-missing-column",
         file_csv([row[:-1] for row in FILE], header=FILE_COLUMNS[:-1]),
         "events.csv", 1, "amount", "missing column"),
    Case("file-csv-unparseable-ts", file_csv(with_cell(FILE, 4, FC["ts"], "yesterday")),
         "events.csv", 6, "ts", "unparseable timestamp"),
    Case("file-csv-negative-amount", file_csv(with_cell(FILE, 6, FC["amount"], "-3.5")),
         "events.csv", 8, "amount", "negative"),
    Case("file-csv-unknown-behaviour", file_csv(with_cell(FILE, 2, FC["behavior"], "click")),
         "events.csv", 4, "behavior", "unknown behaviour"),
    Case("file-csv-empty-file", file_csv(b""),
         "events.csv", None, None, "empty"),
    Case("file-csv-header-only", file_csv([]),
         "events.csv", None, None, "no events"),
    Case("file-csv-wrong-delimiter", file_csv(FILE, delimiter=";"),
         "events.csv", 1, "user_id", "separated by ';'"),
    Case("file-csv-non-utf8", file_csv(with_cell(FILE, 10, FC["category_id"], b"caf\xe9")),
         "events.csv", 12, "category_id", "UTF-8"),
    Case("file-csv-missing-path", file_csv(None),
         "events.csv", None, None, "does not exist"),
    Case("file-csv-non-numeric-quantity", file_csv(with_cell(FILE, 1, FC["quantity"], "two")),
         "events.csv", 3, "quantity", "not a number"),
    Case("file-parquet-missing-column", file_parquet(parquet_table(FILE, drop="amount")),
         "events.parquet", None, "amount", "missing column"),
    Case("file-parquet-negative-amount",
         file_parquet(parquet_table(with_cell(FILE, 4, FC["amount"], "-2"))),
         "events.parquet", 5, "amount", "negative"),
    Case("file-parquet-unknown-behaviour",
         file_parquet(parquet_table(with_cell(FILE, 12, FC["behavior"], "click"))),
         "events.parquet", 13, "behavior", "unknown behaviour"),
    Case("file-parquet-unparseable-ts",
         file_parquet(parquet_table(with_cell(FILE, 15, FC["ts"], "31/12/2017"))),
         "events.parquet", 16, "ts", "unparseable timestamp"),
    Case("file-parquet-zero-rows", file_parquet(parquet_table([])),
         "events.parquet", None, None, "no events"),
]

GOOD: dict[str, Writer] = {  # the same files, unbroken
    "taobao": taobao(TAOBAO, AMOUNTS),
    "file-csv": file_csv(FILE),
    "file-parquet": file_parquet(parquet_table(FILE)),
}

# read_cdnow on a crafted file (header = line 1, so rows[i] is line i + 2): id, bytes, row, column.
CDNOW_CASES = [
    ("negative-dollars", cdnow_bytes(with_cell(CDNOW, 3, CD["dollar_value"], "-11.77")),
     5, "dollar_value"),
    ("unparseable-date", cdnow_bytes(with_cell(CDNOW, 5, CD["date"], "19971345")), 7, "date"),
    ("missing-column", cdnow_bytes(without_cell(CDNOW, 2)), 4, "dollar_value"),
    ("non-utf8", cdnow_bytes(with_cell(CDNOW, 4, CD["customer_id"], b"0\xe90006")),
     6, "customer_id"),
    ("empty-file", b"", None, None),
]


# ------------------------------------------------------------------ helpers


def write_params(tmp: Path, overrides: dict[str, Any]) -> Path:
    """The repo's params.yaml with dotted `data.*` overrides (key order kept)."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        target = params
        for key in parents:
            target = target[key]
        target[last] = value
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def previous_output(tmp: Path) -> tuple[Path, bytes]:
    """A good events file from an earlier run, which a failed run must leave as it was."""
    out = tmp / "out" / "events.parquet"
    out.parent.mkdir()
    one = {"user_id": ["u1"], "ts": [dt.datetime(2017, 11, 25, tzinfo=dt.UTC)],
           "behavior": ["buy"], "item_id": ["i1"], "category_id": ["c1"],
           "quantity": [1.0], "amount": [9.5]}
    pq.write_table(pa.table(one, schema=EVENTS_SCHEMA), out)
    return out, out.read_bytes()


def assert_untouched(out: Path, before: bytes) -> None:
    assert out.read_bytes() == before, "a failed run changed the previous output"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left beside the output: {leftovers}"


def ingest(params: Path, out: Path, truth: Path):
    args = ["ingest", "--params", str(params), "--out", str(out), "--truth-dir", str(truth)]
    return CliRunner().invoke(app, args)


def the_error(output: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line, got:\n{output}"
    return errors[0]


def total(table: pa.Table, column: str) -> float:
    return sum(table.column(column).to_pylist())


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_cleanly(case: Case, tmp_path: Path) -> None:
    params = write_params(tmp_path, case.write(tmp_path))
    out, before = previous_output(tmp_path)
    truth = tmp_path / "truth"

    result = ingest(params, out, truth)

    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}{result.exception!r}"
    message = the_error(result.output)
    assert f"error: {tmp_path / case.named}" in message, message
    if case.row is None:
        assert not re.search(r"\brow \d", message), message
    else:
        assert re.search(rf"\brow {case.row}\b", message), message
    if case.column is None:
        assert "column '" not in message, message
    else:
        assert f"column '{case.column}'" in message, message
    assert case.says in message, message
    assert_untouched(out, before)
    assert not truth.exists()


@pytest.mark.parametrize("write", GOOD.values(), ids=GOOD.keys())
def test_good_input_ingests(write: Writer, tmp_path: Path) -> None:
    assert_ingests(write, len(TAOBAO), tmp_path)


def test_real_taobao_sample_rows_ingest(tmp_path: Path) -> None:
    sample = real_taobao_sample()
    if sample is None:
        pytest.skip(missing_sample_reason())
    rows = taobao_rows(sample)
    amounts = with_cell(AMOUNTS, 1, 0, rows[-1][TB["category_id"]])  # the purchase's category gets a value
    assert_ingests(taobao(rows, amounts), len(rows), tmp_path)


def assert_ingests(write: Writer, rows: int, tmp_path: Path) -> None:
    params = write_params(tmp_path, write(tmp_path))
    out, _ = previous_output(tmp_path)

    result = ingest(params, out, tmp_path / "truth")

    assert result.exit_code == 0, result.output
    events = pq.read_table(out)
    assert events.num_rows == rows
    assert [(f.name, f.type) for f in events.schema] == [(f.name, f.type) for f in EVENTS_SCHEMA]
    assert total(events, "amount") > 0  # the purchase was given a value
    assert (tmp_path / "truth" / "truth.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("content", "row", "column"), [c[1:] for c in CDNOW_CASES],
                         ids=[c[0] for c in CDNOW_CASES])
def test_bad_cdnow_fails_cleanly(
    content: bytes, row: int | None, column: str | None, tmp_path: Path
) -> None:
    path = tmp_path / "CDNOW_master.txt"
    path.write_bytes(content)
    out, before = previous_output(tmp_path)

    with pytest.raises(InputError) as raised:
        write_sorted_events(read_cdnow(path), out, source=str(path))

    assert raised.value.path == str(path)
    assert raised.value.row == row, str(raised.value)
    assert raised.value.column == column, str(raised.value)
    assert "\n" not in str(raised.value)
    assert_untouched(out, before)


def test_good_cdnow_reads(tmp_path: Path) -> None:
    path = tmp_path / "CDNOW_master.txt"
    path.write_bytes(cdnow_bytes(CDNOW))
    out, _ = previous_output(tmp_path)

    assert write_sorted_events(read_cdnow(path), out, source=str(path)) == len(CDNOW)
    events = pq.read_table(out)
    assert set(events.column("behavior").to_pylist()) == {"buy"}
    dollars = sum(float(row[CD["dollar_value"]]) for row in CDNOW)
    assert total(events, "amount") == pytest.approx(dollars)
