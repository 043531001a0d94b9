"""`uservalue tune`: Optuna over the training cutoffs only, each trial a nested run in a real MLflow
(SQLite), the best params written into params.yaml (comments kept) where the train stage reads them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import mlflow
import pytest

from tests.conftest import REPO_ROOT, merge
from uservalue.config import load_params, parse_params
from uservalue.errors import ConfigError
from uservalue.lifecycle.context import StageContext
from uservalue.lifecycle.tune import split_for_tuning, tune_model, write_best_params

SPACE = {"ridge_alpha": {"low": 0.01, "high": 100.0, "log": True},
         "logistic_c": {"low": 0.01, "high": 100.0, "log": True}}


def test_tuning_split_never_sees_the_evaluation_window(cdnow_features) -> None:
    split = split_for_tuning(cdnow_features.train, valid_fraction=0.2, seed=0)
    eval_cutoff = cdnow_features.eval["cutoff"].iloc[0]
    assert (split.fit["cutoff"] < eval_cutoff).all() and (split.score["cutoff"] < eval_cutoff).all()
    # Scored: held-out users at the latest training cutoff only; fitted: the other users.
    assert split.score["cutoff"].nunique() == 1 and split.score["cutoff"].iloc[0] == cdnow_features.train["cutoff"].max()
    assert not set(split.fit["user_id"]) & set(split.score["user_id"])
    assert 0.15 < split.score["user_id"].nunique() / cdnow_features.train["user_id"].nunique() < 0.25


def test_tune_logs_nested_trials_and_writes_the_best_into_params(tmp_path: Path, repo_params, cdnow_features,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = parse_params(merge(repo_params, {
        "tune.space": {"linear": SPACE}, "tune.trials": 3, "tracking.uri": uri,
        "tracking.artifact_location": (tmp_path / "artifacts").as_uri(),
    }))
    result = tune_model(StageContext(tmp_path, params), "linear", cdnow_features.directory)

    assert result.trials == 3 and set(result.best_params) == set(SPACE)
    assert 0.5 < result.best_value < 1.0  # a Gini of a real ranking on held-out users
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parent = next(r for r in runs if r.info.run_id == result.parent_run_id)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert parent.data.tags["stage"] == "tune" and len(trials) == 3
    assert max(t.data.metrics["gini"] for t in trials) == pytest.approx(result.best_value)
    # Trial 0 is the present configuration (the model's defaults here), so tuning never ends worse.
    first = next(t for t in trials if t.data.tags["trial"] == "0")
    assert float(first.data.params["train.linear.ridge_alpha"]) == 1.0

    params_file = tmp_path / "params.yaml"
    params_file.write_text((REPO_ROOT / "params.yaml").read_text())
    write_best_params(params_file, result)
    text = params_file.read_text()
    assert "# stage: evaluate" in text and "path: null" in text  # comments and nulls as they were
    assert load_params(params_file).train.model_params("linear") == result.best_params


def test_tune_without_a_search_space_names_the_field(tmp_path: Path, repo_params, cdnow_features) -> None:
    params = parse_params(merge(repo_params, {"tune.space": {}}))
    with pytest.raises(ConfigError, match=r"tune\.space\.linear"):
        tune_model(StageContext(tmp_path, params), "linear", cdnow_features.directory)
