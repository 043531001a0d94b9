"""Values that follow the data: the validation window (`validate.ts_min/ts_max: auto`) per source and the
cutoffs (`split.*: auto`) from the validated log's time range.

Pure functions of the params and a log's (first, last) timestamps; `time_range` reads those from a Parquet
file with one DuckDB aggregate. The featurize stage writes the resolved split to reports/split.json
(`split_record`), `uservalue plan` shows it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from uservalue.config import AUTO, DataParams, SplitParams, ValidateParams
from uservalue.errors import ConfigError, InputError

DAY = dt.timedelta(days=1)
# The documented windows of the sources that have one ([start, end), UTC).
CDNOW_WINDOW = (dt.datetime(1997, 1, 1, tzinfo=dt.UTC), dt.datetime(1998, 7, 1, tzinfo=dt.UTC))
# The Taobao UserBehavior release: 2017-11-25..2017-12-03 Beijing time (UTC+8).
TAOBAO_WINDOW = (dt.datetime(2017, 11, 24, 16, tzinfo=dt.UTC), dt.datetime(2017, 12, 3, 16, tzinfo=dt.UTC))
# `validate.mode: auto` per source: Taobao's release holds a few rows outside its documented window.
SOURCE_MODES = {"taobao": "quarantine"}
# A file's own range is widened by this on each side (whole UTC days).
FILE_MARGIN = DAY
# Without a horizon for the source, `auto` takes this share of the log's span (whole days, at least one).
AUTO_HORIZON_SHARE = 1 / 3

Window = tuple[dt.datetime, dt.datetime]


def _utc(value: dt.date | dt.datetime) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)


def floor_day(value: dt.datetime) -> dt.datetime:
    value = _utc(value)
    return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)


def time_range(events: str | Path) -> Window:
    """(first, last) event time of a canonical events Parquet file, UTC; no events is an InputError."""
    from uservalue.duck import connect, sql_string

    path = Path(events)
    if not path.is_file():
        raise InputError(path, "file does not exist", expected="canonical events (Parquet)")
    con = connect()
    try:
        first, last = con.execute(f"SELECT min(ts), max(ts) FROM read_parquet({sql_string(str(path))})").fetchone()
    finally:
        con.close()
    if first is None or last is None:
        raise InputError(path, "no events", expected="at least one event to derive the time range from")
    return _utc(first), _utc(last)


def source_window(data: DataParams, observed: Window | None = None) -> Window:
    """The window `validate.ts_min/ts_max: auto` means for `data.source`: CDNOW's and Taobao's documented
    ranges, the synthetic calendar (`start`, `days`), a file's own range widened by FILE_MARGIN (the
    observed (first, last) event times are needed for a file)."""
    if data.source == "cdnow":
        return CDNOW_WINDOW
    if data.source == "taobao":
        return TAOBAO_WINDOW
    if data.source == "synthetic":
        start = _utc(data.synthetic.start)
        return start, start + dt.timedelta(days=data.synthetic.days)
    if observed is None:
        raise ConfigError(f"validate.ts_min/ts_max auto for data.source '{data.source}': the window is the "
                          "data's own range, and no events were read")
    first, last = observed
    return floor_day(first) - FILE_MARGIN, floor_day(last) + DAY + FILE_MARGIN


def needs_observed_range(validate: ValidateParams, data: DataParams) -> bool:
    return data.source not in ("cdnow", "taobao", "synthetic") and AUTO in (validate.ts_min, validate.ts_max)


def resolve_window(validate: ValidateParams, data: DataParams, observed: Window | None = None) -> ValidateParams:
    """`validate` with `auto` bounds replaced by the source's window and an `auto` mode by the source's
    (SOURCE_MODES, else fail); explicit values are kept."""
    if AUTO not in (validate.ts_min, validate.ts_max, validate.mode):
        return validate
    update: dict[str, Any] = {"mode": SOURCE_MODES.get(data.source, "fail")} if validate.mode == AUTO else {}
    if AUTO in (validate.ts_min, validate.ts_max):
        lower, upper = source_window(data, observed)
        update["ts_min"] = lower if validate.ts_min == AUTO else validate.ts_min
        update["ts_max"] = upper if validate.ts_max == AUTO else validate.ts_max
    return validate.model_copy(update=update)


def resolve_window_for(validate: ValidateParams, data: DataParams, events: str | Path) -> ValidateParams:
    """resolve_window, reading the events' time range only when the source's window is the data's own."""
    observed = time_range(events) if needs_observed_range(validate, data) else None
    return resolve_window(validate, data, observed)


def log_end(last_event: dt.datetime, window_end: dt.datetime | None = None) -> dt.datetime:
    """The end of a log (exclusive): the day after its last event, or the source's window end if earlier
    (Taobao's release ends at 16:00 UTC)."""
    end = floor_day(last_event) + DAY
    return min(end, _utc(window_end)) if window_end is not None else end


def resolve_split(split: SplitParams, source: str, observed: Window, window_end: dt.datetime | None = None
                  ) -> SplitParams:
    """`split` with every `auto` value resolved: the source's entry in `split.sources` when it has one,
    else derived from the log's (first, last) event times:

    - horizon_days: a third of the log's span (whole days, at least 1);
    - eval_cutoff: the end of the log (`log_end`) minus horizon_days;
    - train_cutoffs: `train_count` cutoffs stepped back from eval_cutoff by min(horizon, history / (count + 1))
      whole days (history: eval_cutoff minus the first event's day), so every one has history before it.
    """
    if split.is_resolved:
        return split
    preset = split.sources.get(source)
    first, last = observed
    start, end = floor_day(first), log_end(last, window_end)
    span_days = (end - start) / DAY
    horizon = split.horizon_days
    if horizon == AUTO:
        horizon = preset.horizon_days if preset and preset.horizon_days else max(1, int(span_days * AUTO_HORIZON_SHARE))
    eval_cutoff = split.eval_cutoff
    if eval_cutoff == AUTO:
        eval_cutoff = preset.eval_cutoff if preset and preset.eval_cutoff is not None else end - horizon * DAY
    eval_utc = _utc(eval_cutoff)
    if eval_utc <= start:
        raise ConfigError(
            f"split: evaluation cutoff {eval_utc.isoformat()} is not after the log's first day {start.date()} "
            f"(the log spans {span_days:g} days, horizon_days={horizon}): set a shorter split.horizon_days "
            "or an explicit split.eval_cutoff")
    train = split.train_cutoffs
    if train == AUTO:
        if preset and preset.train_cutoffs is not None:
            train = preset.train_cutoffs
        else:
            history_days = (eval_utc - start) / DAY
            step = min(horizon, int(history_days / (split.train_count + 1)))
            train = tuple(eval_utc - k * step * DAY for k in range(1, split.train_count + 1)) if step >= 1 else ()
    try:
        return SplitParams(eval_cutoff=eval_cutoff, horizon_days=horizon, train_cutoffs=train,
                           train_count=split.train_count, sources=split.sources)
    except ValidationError as error:  # e.g. an explicit train cutoff after an auto eval cutoff
        reasons = "; ".join(item["msg"].removeprefix("Value error, ") for item in error.errors())
        raise ConfigError(f"split resolved for data.source '{source}': {reasons}") from None


def resolve_split_for(split: SplitParams, data: DataParams, validate: ValidateParams, events: str | Path
                      ) -> tuple[SplitParams, Window | None]:
    """resolve_split on an events file: (resolved split, the events' time range)."""
    observed = time_range(events)
    if split.is_resolved:
        return split, observed
    return resolve_split(split, data.source, observed, window_end(validate, data, observed)), observed


def window_end(validate: ValidateParams, data: DataParams, observed: Window | None) -> dt.datetime | None:
    """The validation window's upper bound (resolved for the source when auto), if any."""
    if validate.ts_max is None:
        return None
    if validate.ts_max == AUTO:
        return source_window(data, observed)[1]
    return _utc(validate.ts_max)  # type: ignore[arg-type]


def _iso(value: dt.date | dt.datetime) -> str:
    return _utc(value).isoformat()


def split_record(configured: SplitParams, resolved: SplitParams, source: str, observed: Window | None
                 ) -> dict[str, Any]:
    """What reports/split.json holds: the resolved cutoffs, where each came from, and the log's range."""

    def origin(key: str) -> str:
        if getattr(configured, key) != AUTO:
            return "params"
        preset = configured.sources.get(source)
        return f"split.sources.{source}" if preset and getattr(preset, key) is not None else "log"

    return {
        "eval_cutoff": _iso(resolved.eval_cutoff),  # type: ignore[arg-type]
        "horizon_days": resolved.horizon_days,
        "train_cutoffs": [_iso(c) for c in resolved.train_cutoffs_utc],
        "label_windows": {
            "eval": [_iso(resolved.eval_cutoff_utc), _iso(resolved.eval_cutoff_utc + resolved.horizon_days * DAY)],
            "train": [[_iso(c), _iso(min(c + resolved.horizon_days * DAY, resolved.eval_cutoff_utc))]
                      for c in resolved.train_cutoffs_utc],
        },
        "origin": {key: origin(key) for key in ("eval_cutoff", "horizon_days", "train_cutoffs")},
        "data_source": source,
        "log": {"first_event": _iso(observed[0]), "last_event": _iso(observed[1])} if observed else None,
    }


def read_split_record(path: str | Path) -> SplitParams:
    """The resolved split written by the featurize stage (reports/split.json)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file does not exist", expected="reports/split.json written by `uservalue featurize`")
    try:
        record = json.loads(path.read_text())
        return SplitParams(eval_cutoff=record["eval_cutoff"], horizon_days=record["horizon_days"],
                           train_cutoffs=tuple(record["train_cutoffs"]))
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(path, f"not a split record ({error})",
                         expected="JSON with eval_cutoff, horizon_days, train_cutoffs") from None
