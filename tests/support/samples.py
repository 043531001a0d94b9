"""Where the tests find Taobao-format input: the real UserBehavior sample when a folder holding it is named
by USERVALUE_SAMPLE_DIR (its licence is the dataset owner's, so it is never committed), and always a
generated file in the same format (a synthetic log over the same nine days, exported with
`export_taobao_csv`, with the real sample's kind of dirt planted), so a plain clone tests every path."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from uservalue.config import SyntheticSource
from uservalue.data.sources.synthetic import generate
from uservalue.data.sources.taobao import export_taobao_csv

SAMPLE_DIR_ENV = "USERVALUE_SAMPLE_DIR"
TAOBAO_SAMPLE_NAME = "taobao_userbehavior_sample.csv"

# The Taobao release covers 2017-11-25..2017-12-03 (Beijing time); the real sample also holds a few
# events outside it (e.g. 2017-09-11), which ingest keeps and the validation gate must count.
TAOBAO_START = dt.date(2017, 11, 25)
DIRT_TIMESTAMPS = (
    int(dt.datetime(2017, 9, 11, 8, 30, tzinfo=dt.UTC).timestamp()),  # before the release's window
    int(dt.datetime(2017, 12, 4, 12, 0, tzinfo=dt.UTC).timestamp()),  # after it
)
GENERATED_TAOBAO = SyntheticSource(users=300, events_per_user=12.0, start=TAOBAO_START, days=8, seed=11)


def real_taobao_sample() -> Path | None:
    """The real sample if USERVALUE_SAMPLE_DIR names a folder holding it, else None."""
    folder = os.environ.get(SAMPLE_DIR_ENV)
    if not folder:
        return None
    path = Path(folder) / TAOBAO_SAMPLE_NAME
    return path if path.is_file() else None


def missing_sample_reason() -> str:
    folder = os.environ.get(SAMPLE_DIR_ENV)
    where = f"{SAMPLE_DIR_ENV}={folder!r} holds no {TAOBAO_SAMPLE_NAME}" if folder else f"{SAMPLE_DIR_ENV} is not set"
    return (f"the real Taobao UserBehavior sample is not available ({where}); set {SAMPLE_DIR_ENV} to a folder "
            f"holding {TAOBAO_SAMPLE_NAME} (rows user,item,category,behavior,unix_ts) to run this test on it; "
            "the same behaviour is tested on a generated Taobao-format file")


def write_generated_taobao_csv(folder: Path) -> Path:
    """A headerless Taobao UserBehavior CSV: a synthetic log with all four behaviours over the release's
    days, exported in Taobao's layout, plus one event before and one after the release's window and
    three same-second ties."""
    folder.mkdir(parents=True, exist_ok=True)
    events = folder / "generated_events.parquet"
    generate(GENERATED_TAOBAO, events, folder / "generated_truth")
    csv = folder / "taobao_generated.csv"
    export_taobao_csv(events, csv)
    rows = [line.split(",") for line in csv.read_text().splitlines()[:3]]
    first_user, first_item, first_category, *_ = rows[0]
    with csv.open("a") as out:
        for ts in DIRT_TIMESTAMPS:
            out.write(f"{first_user},{first_item},{first_category},pv,{ts}\n")
        # Same-second ties, as the real log has (a cart and a fav in the second of a view): the
        # features' ordering of tied events must be the same in every engine.
        for n, (user, item, category, behavior, ts) in enumerate(rows):
            other = "cart" if behavior != "cart" else "fav"
            out.write(f"{user},{int(item) + 1 + n},{category},{other},{ts}\n")
    return csv
