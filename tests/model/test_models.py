"""Every model behind the one interface: a quick training test each (RecBole style), persistence,
attribution, and behavioural tests (Made With ML style) on the real CDNOW features."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from uservalue.config import MODEL_CATALOG, MODEL_NAMES
from uservalue.errors import ConfigError
from uservalue.models.base import FitContext, validation_mask
from uservalue.models.catalog import create_model, load_model, model_class

# Small settings so that each model trains in seconds; the defaults are exercised by the pipeline.
QUICK = {
    "historical": {},
    "btyd": {},
    "gbdt": {"max_rounds": 60, "early_stopping_rounds": 10},
    "linear": {},
    "mlp": {"max_epochs": 2},
    "sequence": {"max_epochs": 1},
    "gnn": {"max_epochs": 2, "embedding_dim": 16, "neighbors": 8, "hidden": [32], "tower": 32, "batch_size": 2048},
    "ensemble": {"members": {"gbdt": {"max_rounds": 60, "early_stopping_rounds": 10}, "mlp": {"max_epochs": 1}}},
}


def test_every_catalog_entry_is_a_model_with_a_params_section() -> None:
    from uservalue.config import TrainParams
    from uservalue.models.base import ValueModel

    assert MODEL_NAMES == tuple(MODEL_CATALOG) and set(MODEL_NAMES) == set(QUICK)
    for name in MODEL_NAMES:
        assert issubclass(model_class(name), ValueModel) and model_class(name).name == name
        assert TrainParams().model_params(name) == {}  # train.<name> exists, empty by default


def test_training_labels_never_overlap_the_holdout(cdnow_features) -> None:
    eval_cutoff = dt.datetime.fromisoformat(cdnow_features.meta["splits"]["eval"][0]["cutoff"])
    for cutoff, rows in cdnow_features.train.groupby("cutoff"):
        label_end = cutoff.to_pydatetime() + dt.timedelta(days=float(rows["label_days"].iloc[0]))
        assert label_end <= eval_cutoff
        assert rows["label_days"].max() <= cdnow_features.horizon_days


class _Trained(dict):
    """name -> (model, predictions on the evaluation cutoff, saved directory), trained on first use."""

    def __init__(self, features, tmp_path_factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.features, self.tmp_path_factory = features, tmp_path_factory

    def __missing__(self, name: str) -> tuple:
        features = self.features
        model = create_model(name, QUICK[name], features.spec, features.horizon_days)
        directory = self.tmp_path_factory.mktemp(name)
        model.fit(features.train, FitContext(seed=0, device="cpu", checkpoint_dir=directory / "ckpt"))
        model.save(directory / "model")
        self[name] = (model, model.predict(features.eval), directory / "model")
        return self[name]


@pytest.fixture(scope="module")
def trained(cdnow_features, tmp_path_factory: pytest.TempPathFactory) -> _Trained:
    return _Trained(cdnow_features, tmp_path_factory)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_quick_training_predicts_every_user_in_range(name: str, trained, cdnow_features) -> None:
    _model, predicted, _ = trained[name]
    assert list(predicted.columns) == ["user_id", "p_buy", "expected_value"]
    assert predicted["user_id"].tolist() == cdnow_features.eval["user_id"].astype(str).tolist()
    assert predicted["p_buy"].between(0, 1).all()
    assert (predicted["expected_value"] >= 0).all() and np.isfinite(predicted["expected_value"]).all()
    # Not a constant: the model ranks users.
    assert predicted["expected_value"].nunique() > 100


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_saved_model_loads_and_predicts_identically(name: str, trained, cdnow_features) -> None:
    model, predicted, directory = trained[name]
    loaded = load_model(directory)
    assert type(loaded) is type(model)
    again = loaded.predict(cdnow_features.eval)
    np.testing.assert_allclose(again["expected_value"], predicted["expected_value"], rtol=1e-5)
    np.testing.assert_allclose(again["p_buy"], predicted["p_buy"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_attribution_shares_sum_to_one(name: str, trained, cdnow_features) -> None:
    model, _predicted, _ = trained[name]
    shares = model.attribute(cdnow_features.eval.head(300))
    behaviors = list(cdnow_features.spec.behaviors)
    assert list(shares.columns) == ["user_id", *behaviors]
    np.testing.assert_allclose(shares[behaviors].sum(axis=1), 1.0, rtol=1e-6)
    assert (shares[behaviors] >= 0).all().all()
    influence = model.influence()
    if influence is not None:
        assert set(influence) == set(behaviors)
        assert sum(influence.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["historical", "btyd", "gbdt", "linear", "mlp", "sequence", "gnn", "ensemble"])
def test_frequent_recent_buyers_outrank_lapsed_one_time_buyers(name: str, trained, cdnow_features) -> None:
    _model, predicted, _ = trained[name]
    features = cdnow_features.eval.reset_index(drop=True)
    loyal = (features["btyd_frequency"] >= 4) & (features["recency_days"] <= 30)
    lapsed = (features["btyd_frequency"] == 0) & (features["recency_days"] >= 200)
    assert loyal.sum() > 50 and lapsed.sum() > 50
    value = predicted["expected_value"]
    assert value[loyal].mean() > 3 * value[lapsed].mean()
    assert predicted.loc[loyal, "p_buy"].mean() > 1.5 * predicted.loc[lapsed, "p_buy"].mean()


def test_unknown_model_params_are_rejected_with_the_field_name(cdnow_features) -> None:
    with pytest.raises(ConfigError, match=r"train\.gbdt\.num_leavs"):
        create_model("gbdt", {"num_leavs": 3}, cdnow_features.spec, cdnow_features.horizon_days)
    with pytest.raises(ConfigError, match=r"train\.models: unknown model 'xgb'"):
        create_model("xgb", {}, cdnow_features.spec, cdnow_features.horizon_days)


def test_validation_split_is_by_user_and_stable() -> None:
    users = pd.Series([f"u{i}" for i in range(5000)] * 2)  # the same users at two cutoffs
    mask = validation_mask(users, 0.2, seed=3)
    assert 0.17 < mask.mean() < 0.23
    assert (mask[:5000] == mask[5000:]).all()  # a user is on one side at every cutoff
    assert (validation_mask(users, 0.2, seed=3) == mask).all()


def test_gbdt_offsets_make_predictions_independent_of_label_window(trained, cdnow_features) -> None:
    model, predicted, _ = trained["gbdt"]
    relabelled = cdnow_features.eval.assign(label_days=92.0)  # scoring ignores any label window
    np.testing.assert_allclose(model.predict(relabelled)["expected_value"], predicted["expected_value"])


def test_linear_learns_that_longer_windows_hold_more_value(trained) -> None:
    model, _predicted, _ = trained["linear"]
    # the coefficient on log(label_days / horizon) of the value and p_buy parts
    assert model._ridge[-2] > 0 and model._logistic[-2] > 0


def test_model_directory_without_header_is_a_clear_error(tmp_path: Path) -> None:
    from uservalue.errors import InputError

    with pytest.raises(InputError, match="model.json"):
        load_model(tmp_path)
