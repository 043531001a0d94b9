"""Cutoffs and validation windows that follow the data (issue 17 §2): `split.*: auto` resolved from the
validated log's range and the source's entry in `split.sources`, `validate.ts_min/ts_max: auto` per source,
and `uservalue plan` showing what featurize will use."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from uservalue.config import DataParams, SplitParams, ValidateParams
from uservalue.data.window import (
    CDNOW_WINDOW,
    TAOBAO_WINDOW,
    resolve_split,
    resolve_split_for,
    resolve_window,
    resolve_window_for,
    source_window,
    split_record,
)
from uservalue.errors import ConfigError
from uservalue.orchestration.stage_runner import plan

UTC = dt.UTC
AUTO_SPLIT = {"eval_cutoff": "auto", "horizon_days": "auto", "train_cutoffs": "auto", "train_count": 2,
              "sources": {"cdnow": {"eval_cutoff": "1997-10-01", "horizon_days": 273,
                                    "train_cutoffs": ["1997-07-01", "1997-04-01"]},
                          "taobao": {"horizon_days": 1}}}


def t(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def test_a_file_log_gets_cutoffs_from_its_own_range() -> None:
    split = SplitParams.model_validate(AUTO_SPLIT)
    resolved = resolve_split(split, "file", (t(2009, 12, 1, 7, 45), t(2011, 12, 9, 12, 50)))
    # The log ends the day after its last event: 2011-12-10; a third of its 739-day span is the horizon.
    assert resolved.horizon_days == 246
    assert resolved.eval_cutoff_utc == t(2011, 12, 10) - dt.timedelta(days=246)
    # Two training cutoffs stepped back by the horizon at most, each with history before it.
    step = dt.timedelta(days=min(246, int((resolved.eval_cutoff_utc - t(2009, 12, 1)).days / 3)))
    assert resolved.train_cutoffs_utc == (resolved.eval_cutoff_utc - 2 * step, resolved.eval_cutoff_utc - step)
    assert all(c > t(2009, 12, 1) for c in resolved.train_cutoffs_utc)
    record = split_record(split, resolved, "file", (t(2009, 12, 1, 7, 45), t(2011, 12, 9, 12, 50)))
    assert record["origin"] == {"eval_cutoff": "log", "horizon_days": "log", "train_cutoffs": "log"}
    assert record["label_windows"]["eval"] == [resolved.eval_cutoff_utc.isoformat(), "2011-12-10T00:00:00+00:00"]


def test_cdnow_auto_is_the_literature_split_and_explicit_values_win() -> None:
    split = SplitParams.model_validate(AUTO_SPLIT)
    log = (t(1997, 1, 1), t(1998, 6, 30))
    cdnow = resolve_split(split, "cdnow", log)
    assert (cdnow.eval_cutoff_utc, cdnow.horizon_days) == (t(1997, 10, 1), 273)
    assert cdnow.train_cutoffs_utc == (t(1997, 4, 1), t(1997, 7, 1))
    # `dvc exp run -S split.eval_cutoff=1997-12-01 -S split.horizon_days=180`: those win, the rest stays auto.
    mixed = resolve_split(split.model_copy(update={"eval_cutoff": dt.date(1997, 12, 1), "horizon_days": 180}),
                          "cdnow", log)
    assert (mixed.eval_cutoff_utc, mixed.horizon_days) == (t(1997, 12, 1), 180)
    assert mixed.train_cutoffs_utc == (t(1997, 4, 1), t(1997, 7, 1))
    assert split_record(split, cdnow, "cdnow", log)["origin"]["eval_cutoff"] == "split.sources.cdnow"


def test_taobao_ends_where_its_release_ends() -> None:
    split = SplitParams.model_validate(AUTO_SPLIT)
    # The real log's last events are at 15:59 UTC on 2017-12-03 (midnight in Beijing).
    resolved = resolve_split(split, "taobao", (t(2017, 11, 24, 16, 0), t(2017, 12, 3, 15, 59)), TAOBAO_WINDOW[1])
    assert (resolved.eval_cutoff_utc, resolved.horizon_days) == (t(2017, 12, 2, 16), 1)
    assert resolved.train_cutoffs_utc == (t(2017, 11, 30, 16), t(2017, 12, 1, 16))


def test_impossible_splits_are_clear_errors() -> None:
    split = SplitParams.model_validate({**AUTO_SPLIT, "horizon_days": 30})
    with pytest.raises(ConfigError, match=r"not after the log's first day.*horizon_days=30"):
        resolve_split(split, "file", (t(2020, 1, 1), t(2020, 1, 20)))
    late = SplitParams.model_validate({**AUTO_SPLIT, "horizon_days": 5, "train_cutoffs": ["2020-03-01"]})
    with pytest.raises(ConfigError, match=r"data.source 'file'.*train_cutoffs.*must be earlier"):
        resolve_split(late, "file", (t(2020, 1, 1), t(2020, 1, 31)))
    with pytest.raises(ConfigError, match=r"split.eval_cutoff.*is auto: resolve"):
        _ = split.eval_cutoff_utc


def test_validation_window_per_source() -> None:
    auto = ValidateParams(ts_min="auto", ts_max="auto")
    assert resolve_window(auto, DataParams(source="cdnow")).window == CDNOW_WINDOW
    assert resolve_window(auto, DataParams(source="taobao", path="x.csv")).window == TAOBAO_WINDOW
    synthetic = DataParams.model_validate({"source": "synthetic", "synthetic": {"start": "2020-02-01", "days": 10}})
    assert source_window(synthetic) == (t(2020, 2, 1), t(2020, 2, 11))
    own = resolve_window(auto, DataParams(source="file", path="x.csv"), (t(2021, 3, 4, 10), t(2021, 5, 6, 23)))
    assert own.window == (t(2021, 3, 3), t(2021, 5, 8))  # the data's days, one more on each side
    explicit = resolve_window(ValidateParams(ts_min="auto", ts_max="2000-01-01"), DataParams(source="cdnow"))
    assert explicit.window == (CDNOW_WINDOW[0], t(2000, 1, 1))
    with pytest.raises(ConfigError, match=r"validate.ts_min, validate.ts_max is auto"):
        _ = auto.window
    # mode auto: Taobao's release holds out-of-window rows (quarantined), every other source fails on them.
    modes = {source: resolve_window(ValidateParams(mode="auto"), DataParams(source=source, path="x.csv")).mode
             for source in ("cdnow", "taobao", "synthetic", "file")}
    assert modes == {"cdnow": "fail", "taobao": "quarantine", "synthetic": "fail", "file": "fail"}
    assert resolve_window(ValidateParams(mode="fail"), DataParams(source="taobao", path="x.csv")).mode == "fail"
    with pytest.raises(ConfigError, match="the data's own range"):
        resolve_window(auto, DataParams(source="file", path="x.csv"))


def _events(path: Path, times: list[str]) -> Path:
    pd.DataFrame({"user_id": [f"u{i}" for i in range(len(times))], "ts": pd.to_datetime(times, utc=True),
                  "behavior": "buy", "amount": 1.0}).to_parquet(path)
    return path


def test_resolution_reads_the_events_file_range(tmp_path: Path) -> None:
    events = _events(tmp_path / "events.parquet", ["2021-03-04T10:00:00Z", "2021-06-30T08:00:00Z"])
    data = DataParams(source="file", path="x.csv")
    checks = resolve_window_for(ValidateParams(ts_min="auto", ts_max="auto"), data, events)
    assert checks.window == (t(2021, 3, 3), t(2021, 7, 2))
    split, observed = resolve_split_for(SplitParams.model_validate(AUTO_SPLIT), data, checks, events)
    assert observed == (t(2021, 3, 4, 10), t(2021, 6, 30, 8))
    assert split.eval_cutoff_utc == t(2021, 7, 1) - dt.timedelta(days=split.horizon_days)


def test_plan_shows_the_cutoffs_featurize_will_use(tmp_path: Path) -> None:
    params = {"data": {"source": "file", "path": "data/raw/orders.csv"},
              "validate": {"ts_min": "auto", "ts_max": "auto"}, "split": AUTO_SPLIT}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    before = plan(tmp_path, {})
    assert before["eval_cutoff"] == "auto" and "no data/validated.parquet yet" in before["split"]["note"]
    (tmp_path / "data").mkdir()
    _events(tmp_path / "data/validated.parquet", ["2021-01-01T00:00:00Z", "2021-03-31T12:00:00Z"])
    shown = plan(tmp_path, {})
    json.dumps(shown)  # the command prints it as one JSON line
    assert shown["split"]["resolved_from"] == "data/validated.parquet"
    assert shown["split"]["horizon_days"] == 30 and shown["eval_cutoff"] == "2021-03-02T00:00:00+00:00"
    assert shown["split"]["log"]["last_event"] == "2021-03-31T12:00:00+00:00"
    changed = plan(tmp_path, {"data.path": "data/raw/other.csv"})
    assert changed["split"]["resolved_from"] is None and "change the data" in changed["split"]["note"]
    explicit = plan(tmp_path, {"split.eval_cutoff": "2021-02-01", "split.horizon_days": 20,
                               "split.train_cutoffs": ["2021-01-15"]})
    assert explicit["split"]["resolved_from"] == "params" and explicit["eval_cutoff"] == "2021-02-01T00:00:00+00:00"
