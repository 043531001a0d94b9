"""The served predictions, appended to Parquet by a background thread (`date=YYYY-MM-DD/part-*.parquet`),
and read back for the monitor."""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from uservalue.io import atomic_path

PREDICTION_LOG_COLUMNS = ("request_time", "request_id", "as_of", "model_name", "model_version", "user_id",
                          "p_buy", "expected_value", "horizon_days")


logger = logging.getLogger(__name__)


PREDICTION_COLUMNS = ("p_buy", "expected_value")


def non_finite_rows(frame: pd.DataFrame) -> pd.Series:
    """Per row: does a float column hold +-inf, or a prediction NaN? (A missing feature may be NaN; the
    log and the monitor need every number finite.)"""
    floats = frame.select_dtypes(include="floating")
    if floats.empty:
        return pd.Series(False, index=frame.index)
    bad = np.isinf(floats.to_numpy(dtype="float64")).any(axis=1)
    for column in PREDICTION_COLUMNS:
        if column in floats.columns:
            bad |= floats[column].isna().to_numpy()
    return pd.Series(bad, index=frame.index)


def finite_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows whose numbers are finite; the others are dropped with a warning naming the columns."""
    bad = non_finite_rows(frame)
    if not bad.any():
        return frame
    floats = frame.loc[bad].select_dtypes(include="floating")
    columns = sorted(c for c in floats.columns
                     if np.isinf(floats[c].to_numpy(dtype="float64")).any() or
                     (c in PREDICTION_COLUMNS and floats[c].isna().any()))
    logger.warning("prediction log: %d rows with non-finite values in %s not logged", int(bad.sum()), columns)
    return frame[~bad.to_numpy()]


class PredictionLog:
    """Append-only Parquet log of served predictions: `<dir>/date=YYYY-MM-DD/part-*.parquet`.

    Requests only append to a buffer (microseconds); a background thread writes it out when it
    holds `flush_records` rows or is `flush_seconds` old, and `close()` writes what is left, so a
    stopping service loses nothing. Files rotate by day (the folder) and by size (one file per
    flush, at most `flush_records` rows each); each is written atomically (a reader never sees half a file).
    """

    def __init__(self, directory: str | Path, flush_records: int = 1000, flush_seconds: float = 5.0) -> None:
        self.directory = Path(directory)
        self.flush_records = flush_records
        self.flush_seconds = flush_seconds
        self._frames: list[pd.DataFrame] = []
        self._rows = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._written = 0
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    @property
    def written(self) -> int:
        return self._written

    def append(self, frame: pd.DataFrame) -> None:
        if self._closed.is_set():
            raise RuntimeError("the prediction log is closed")
        with self._lock:
            self._frames.append(frame)
            self._rows += len(frame)
            full = self._rows >= self.flush_records
        if full:
            self._wake.set()

    def flush(self) -> int:
        with self._lock:
            frames, self._frames, self._rows = self._frames, [], 0
        if not frames:
            return 0
        data = pd.concat(frames, ignore_index=True)
        days = data["request_time"].dt.strftime("%Y-%m-%d")
        for day, part in data.groupby(days, sort=True):
            for start in range(0, len(part), self.flush_records):
                self._write(day, part.iloc[start:start + self.flush_records])
        self._written += len(data)
        return len(data)

    def _write(self, day: str, part: pd.DataFrame) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%H%M%S%f")
        name = f"part-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        # The temporary name starts with a dot: read_prediction_log's pattern never matches it.
        with atomic_path(self.directory / f"date={day}" / name) as tmp:
            part.to_parquet(tmp, index=False)

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()


def read_prediction_log(directory: str | Path, since: dt.datetime | None = None,
                        until: dt.datetime | None = None) -> pd.DataFrame:
    """Every logged prediction with since <= request_time < until (all when not given)."""
    directory = Path(directory)
    files = sorted(directory.glob("date=*/part-*.parquet"))
    if since is not None:
        first_day = since.astimezone(dt.UTC).date().isoformat()
        files = [f for f in files if f.parent.name.removeprefix("date=") >= first_day]
    if not files:
        return pd.DataFrame(columns=list(PREDICTION_LOG_COLUMNS))
    data = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if since is not None:
        data = data[data["request_time"] >= pd.Timestamp(since)]
    if until is not None:
        data = data[data["request_time"] < pd.Timestamp(until)]
    return data.sort_values("request_time", kind="stable").reset_index(drop=True)
