"""Another source without window, mode or cutoff overrides (issue 17 §2): `dvc exp run -S data.source=taobao
-S data.path=...` validates against Taobao's documented window (its out-of-window rows quarantined: mode auto)
and derives the cutoffs from the log, written to reports/split.json (slow: a real DVC experiment in a
temporary git repository)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import run_in

pytestmark = pytest.mark.slow


def test_taobao_runs_without_window_or_split_overrides(make_project, taobao_sample: Path) -> None:
    project = make_project()
    shutil.copy2(taobao_sample, project / "data/raw/UserBehavior.csv")
    # Not window overrides: the samples (generated, and the real one of 43 users) are too small for the
    # repository's min_purchases and min_users.
    run_in(project, "dvc", "exp", "run", "featurize", "-S", "data.source=taobao",
           "-S", "data.path=data/raw/UserBehavior.csv", "-S", "validate.min_purchases=10",
           "-S", "validate.min_users=10", timeout=900)
    summary = json.loads((project / "reports/validation/summary.json").read_text())
    assert summary["success"] and summary["mode"] == "quarantine" and summary["rows_quarantined"] >= 1
    assert summary["quarantine_reasons"] == {"expect_column_values_to_be_between(ts)": summary["rows_quarantined"]}
    split = json.loads((project / "reports/split.json").read_text())
    assert split["data_source"] == "taobao" and split["horizon_days"] == 1
    assert split["origin"] == {"eval_cutoff": "log", "horizon_days": "split.sources.taobao", "train_cutoffs": "log"}
    last = dt.datetime.fromisoformat(split["log"]["last_event"])
    end = min(dt.datetime.combine(last.date() + dt.timedelta(days=1), dt.time(), dt.UTC),
              dt.datetime(2017, 12, 3, 16, tzinfo=dt.UTC))  # the release ends at midnight in Beijing
    assert dt.datetime.fromisoformat(split["eval_cutoff"]) == end - dt.timedelta(days=1)
    assert split["train_cutoffs"] == [(end - dt.timedelta(days=k)).isoformat() for k in (3, 2)]
    meta = json.loads((project / "data/features/meta.json").read_text())
    assert meta["splits"]["eval"][0]["cutoff"].startswith(split["eval_cutoff"][:19])
    assert meta["rows"]["eval"] >= 10 and meta["rows"]["train"] >= 10  # the real sample: 43 users
