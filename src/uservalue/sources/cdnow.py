"""CDNOW master log (23,570 customers, 1997-01 to 1998-06), shipped inside the `lifetimes` wheel.

We only read the data file that the distribution carries; lifetimes itself is never imported.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pandas as pd
import pyarrow as pa

from uservalue.errors import InputError
from uservalue.sources.tabular import TabularSpec, _Batch

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
    path = path or cdnow_path()
    frame = pd.read_csv(path, sep=r"\s+", dtype=str, header=0, names=list(COLUMNS))
    frame["behavior"] = "buy"
    table = pa.Table.from_pandas(frame, preserve_index=False)
    # Row 1 of the file is the header, so data row i is file row i + 2.
    yield _Batch(table, path, first_row=2, spec=SPEC).canonical()
