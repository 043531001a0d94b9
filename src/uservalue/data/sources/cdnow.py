"""CDNOW master log (23,570 customers, 1997-01 to 1998-06), shipped inside the `lifetimes` wheel.

We only read the data file that the distribution carries; lifetimes itself is never imported.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pyarrow as pa

from uservalue.data.sources.tabular import RawBatch, TabularSpec, check_readable
from uservalue.errors import InputError

DISTRIBUTION = "lifetimes"
RELATIVE_PATH = "lifetimes/datasets/CDNOW_master.txt"
COLUMNS = ("customer_id", "date", "number_of_cds", "dollar_value")

SPEC = TabularSpec(
    columns={
        "user_id": "customer_id",
        "ts": "date",
        "behavior": "behavior",
        "quantity": "number_of_cds",
        "amount": "dollar_value",
    },
    behaviors={"buy": "buy"},
    ts_format="%Y%m%d",
    params_hint="data.source",
)


def cdnow_path() -> Path:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise InputError(
            DISTRIBUTION, "the CDNOW data set ships in the 'lifetimes' distribution, which is not installed",
            expected="pip install lifetimes==0.11.3",
        ) from None
    path = Path(str(dist.locate_file(RELATIVE_PATH)))
    if not path.is_file():
        raise InputError(path, "CDNOW master file missing from the lifetimes distribution")
    return path


def read_cdnow(path: Path | None = None) -> Iterator[pa.Table]:
    """CDNOW holds purchases only: amount = dollars, quantity = CDs."""
    path = Path(path) if path else cdnow_path()
    check_readable(path)
    values: list[list[str]] = []
    line_of_row: list[int] = []  # physical line (header = line 1) of each data row
    header_seen = False
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            cells = raw.split()  # bytes.split: ASCII whitespace only, as in the original file
            try:
                fields = [cell.decode("utf-8") for cell in cells]
            except UnicodeDecodeError:
                raise _not_utf8(path, number, cells) from None
            if not fields:
                continue
            if not header_seen:
                header_seen = True
                continue
            if len(fields) != len(COLUMNS):
                raise InputError(
                    path, f"{len(fields)} whitespace-separated field(s)", row=number,
                    column=COLUMNS[len(fields)] if len(fields) < len(COLUMNS) else None,
                    expected=f"{len(COLUMNS)} fields ({' '.join(COLUMNS)})", found=" ".join(fields),
                )
            values.append(fields)
            line_of_row.append(number)
    columns = {name: [row[i] for row in values] for i, name in enumerate(COLUMNS)}
    columns["behavior"] = ["buy"] * len(values)
    table = pa.table({name: pa.array(v, pa.string()) for name, v in columns.items()})
    try:
        yield RawBatch(table, path, first_row=0, spec=SPEC).canonical()
    except InputError as error:
        if error.row is None:
            raise
        # RawBatch counted rows from 0; report the physical line (blank lines are skipped above).
        raise InputError(
            error.path, error.problem, row=line_of_row[error.row], column=error.column,
            expected=error.expected, found=error.found,
        ) from None



def _not_utf8(path: Path, row: int, cells: list[bytes]) -> InputError:
    """Name the first field of a line whose bytes are not UTF-8."""
    for index, cell in enumerate(cells):
        try:
            cell.decode("utf-8")
        except UnicodeDecodeError as error:
            return InputError(
                path, f"bytes are not valid UTF-8 (byte 0x{cell[error.start]:02x})", row=row,
                column=COLUMNS[index] if index < len(COLUMNS) else None, expected="UTF-8 text",
            )
    raise AssertionError("a line that failed to decode has a field that fails to decode")
