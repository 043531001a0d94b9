"""The deep models ("mlp", "sequence") end to end on real CDNOW features, and the sequence model's
behaviour influence against the truth planted in a synthetic log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from uservalue.models.base import PREDICTION_COLUMNS
from uservalue.models.catalog import create_model, load_model
from uservalue.models.influence import (
    arrays_from_frame,
    effect_order,
    influence_tables,
    sample_rows,
    seen_behaviors,
)
from uservalue.models.base import FitContext

QUICK = {
    "mlp": {"max_epochs": 2, "hidden": [32], "tower": 32, "embedding_dim": 8, "user_buckets": 2048},
    "transformer": {"max_epochs": 1, "d_model": 16, "tower": 32, "hidden": [32], "lr": 2e-3},
    "causal-transformer": {"max_epochs": 1, "d_model": 16, "n_layers": 2, "causal": True, "tower": 16,
                           "hidden": [16], "lr": 2e-3},
    "gru": {"encoder": "gru", "max_epochs": 1, "d_model": 16, "tower": 32, "hidden": [32], "lr": 2e-3},
    "lstm": {"encoder": "lstm", "max_epochs": 1, "d_model": 16, "tower": 32, "hidden": [32], "lr": 2e-3},
}


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    ranks = pd.Series(scores).rank().to_numpy()
    positive = labels.astype(bool)
    n1, n0 = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


@pytest.mark.parametrize("variant", list(QUICK))
def test_fit_predict_save_load(cdnow_features, tmp_path: Path, variant: str) -> None:
    name = "mlp" if variant == "mlp" else "sequence"
    train = cdnow_features.train.iloc[::2]
    evaluation = cdnow_features.eval
    model = create_model(name, QUICK[variant], cdnow_features.spec, cdnow_features.horizon_days)
    summary = model.fit(train, FitContext(seed=0))
    assert summary["epochs_run"] >= 1 and np.isfinite(summary["best_valid_loss"])

    predicted = model.predict(evaluation)
    assert tuple(predicted.columns) == PREDICTION_COLUMNS
    assert predicted["user_id"].tolist() == evaluation["user_id"].astype(str).tolist()
    assert predicted["p_buy"].between(0, 1).all()
    assert np.isfinite(predicted["expected_value"]).all() and (predicted["expected_value"] >= 0).all()
    assert auc(evaluation["bought"].to_numpy(), predicted["p_buy"].to_numpy()) > 0.7
    ratio = predicted["expected_value"].sum() / evaluation["value"].sum()
    assert 0.3 < ratio < 3

    # The influence tables (models.influence) are saved with the model.
    sample = arrays_from_frame(evaluation.head(200), cdnow_features.spec)
    model.set_influence(influence_tables(model, sample, seen_behaviors(train, cdnow_features.spec.behaviors)))
    model.save(tmp_path / name)
    loaded = load_model(tmp_path / name)
    assert type(loaded) is type(model) and loaded.params == model.params
    pd.testing.assert_frame_equal(loaded.predict(evaluation), predicted)
    assert loaded.influence_tables == model.influence_tables

    # CDNOW has purchases only: every user's prediction is owed to "buy", and no effect is reported
    # for the behaviours the model never saw.
    influence = model.influence()
    assert influence is not None and sum(influence.values()) == pytest.approx(1.0)
    assert influence["buy"] == pytest.approx(1.0)
    assert model.influence_tables.effect == {"view": None, "fav": None, "cart": None}
    shares = loaded.attribute(evaluation.head(300))
    assert list(shares.columns) == ["user_id", *cdnow_features.spec.behaviors]
    np.testing.assert_allclose(shares[list(cdnow_features.spec.behaviors)].sum(axis=1), 1.0)
    assert (shares["buy"] == 1.0).all()


@pytest.fixture(scope="module")
def synthetic_sequence_models(synthetic_features) -> list:
    models = []
    for seed, encoder in ((0, "transformer"), (1, "transformer"), (0, "gru")):
        model = create_model("sequence", {"encoder": encoder}, synthetic_features.spec, synthetic_features.horizon_days)
        model.fit(synthetic_features.train, FitContext(seed=seed))
        models.append(model)
    return models


@pytest.mark.slow  # trains three sequence encoders (~30 s); make test runs it
def test_influence_recovers_the_planted_ranking(synthetic_sequence_models, synthetic_features) -> None:
    """Planted: one cart leads to 0.2 purchases, one fav to 0.04, one view to 0.004 (the default
    synthetic log, views 89% of the events): the effect of one more event ranks them so."""
    train = synthetic_features.train
    sample = arrays_from_frame(train.iloc[sample_rows(len(train), 1000, 0)], synthetic_features.spec)
    seen = seen_behaviors(train, synthetic_features.spec.behaviors)
    for model in synthetic_sequence_models:
        tables = influence_tables(model, sample, seen)
        assert sum(tables.share.values()) == pytest.approx(1.0)
        assert all(share >= 0 for share in tables.share.values())
        assert effect_order(tables.effect) == ["cart", "fav", "view"], tables.effect


@pytest.mark.slow  # shares the three encoders' fixture; every model's shares are in test_models
def test_attribution_per_user(synthetic_sequence_models, synthetic_features) -> None:
    model = synthetic_sequence_models[0]
    users = synthetic_features.eval.head(400)
    shares = model.attribute(users)
    behaviors = list(synthetic_features.spec.behaviors)
    assert shares["user_id"].tolist() == users["user_id"].astype(str).tolist()
    np.testing.assert_allclose(shares[behaviors].sum(axis=1), 1.0)
    assert ((shares[behaviors] >= 0) & (shares[behaviors] <= 1)).all().all()
    for b in behaviors:  # a behaviour the user never did gets nothing
        never = users[f"{b}_count"].to_numpy() == 0
        assert (shares.loc[never, b] == 0).all()
    # Across users, carts explain more of the prediction per cart than views per view.
    per_event = shares[behaviors].sum() / users[[f"{b}_count" for b in behaviors]].sum().to_numpy()
    assert per_event["cart"] > per_event["view"]
