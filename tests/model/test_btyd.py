"""The BTYD model (pymc-marketing's BG/NBD / Pareto/NBD + Gamma-Gamma) on real CDNOW features.

No mocks: the library fits for real (the first PyTensor compile takes ~30 s, so one module-scoped
fit serves the tests)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from uservalue.models.base import FitContext
from uservalue.models.btyd import INPUT_COLUMNS, BtydModel, rfm_summary
from uservalue.models.catalog import create_model, load_model

# Published-scale CDNOW values (Fader, Hardie & Lee 2005, 39-week calibration, weeks) for a
# model that is built, not fitted: the library-agreement checks need only plausible parameters.
PARETO_STATE = {
    "transaction": {"r": 0.55, "alpha": 10.58, "s": 0.61, "beta": 11.67},
    "spend": {"p": 6.25, "q": 3.74, "v": 15.44},
}


@pytest.fixture(scope="module")
def fitted(cdnow_features) -> tuple[BtydModel, dict[str, float], pd.DataFrame]:
    model = create_model("btyd", {}, cdnow_features.spec, cdnow_features.horizon_days)
    start = time.perf_counter()
    summary = model.fit(cdnow_features.train, FitContext(seed=0))
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    predictions = model.predict(cdnow_features.eval)
    print(f"\nBTYD fit {fit_seconds:.1f}s, predict {time.perf_counter() - start:.1f}s: {summary}")
    return model, summary, predictions


def edited_rows(template: pd.Series, edits: list[dict[str, float]]) -> pd.DataFrame:
    rows = pd.DataFrame([template] * len(edits)).reset_index(drop=True)
    for i, edit in enumerate(edits):
        for column, value in edit.items():
            rows.loc[i, column] = value
    rows["user_id"] = [f"u{i}" for i in range(len(edits))]
    return rows


def test_predictions_shape_and_range(fitted, cdnow_features) -> None:
    _model, summary, predictions = fitted
    assert list(predictions.columns) == ["user_id", "p_buy", "expected_value"]
    assert len(predictions) == len(cdnow_features.eval)
    assert (predictions["user_id"].to_numpy() == cdnow_features.eval["user_id"].astype(str).to_numpy()).all()
    assert predictions["p_buy"].between(0.0, 1.0).all()
    assert np.isfinite(predictions["expected_value"]).all()
    assert (predictions["expected_value"] >= 0).all()
    # Fitted on the latest training cutoff only: one row per CDNOW customer.
    latest = cdnow_features.train["cutoff"].max()
    assert summary["n_customers"] == (cdnow_features.train["cutoff"] == latest).sum()
    for name in ("r", "alpha", "a", "b", "p", "q", "v"):
        assert np.isfinite(summary[name]) and summary[name] > 0
    # BG/NBD on CDNOW (weeks): the published 39-week fit is r=0.24, alpha=4.41, a=0.79, b=2.43;
    # ours sees 26 weeks, so only the scale is checked.
    assert 0.1 < summary["r"] < 0.5 and 2.0 < summary["alpha"] < 8.0
    assert summary["q"] > 1 and 15 < summary["population_mean_spend"] < 80


def test_btyd_inputs(fitted, cdnow_features) -> None:
    model, summary, predictions = fitted
    inputs = model.btyd_inputs(cdnow_features.eval)
    assert list(inputs.columns) == list(INPUT_COLUMNS)
    assert len(inputs) == len(cdnow_features.eval)
    assert inputs["btyd_p_alive"].between(0, 1).all()
    assert (inputs["btyd_expected_purchases"] >= 0).all() and (inputs["btyd_expected_spend"] > 0).all()
    np.testing.assert_allclose(
        predictions["expected_value"], inputs["btyd_expected_purchases"] * inputs["btyd_expected_spend"]
    )
    one_timers = cdnow_features.eval["btyd_frequency"].to_numpy() == 0
    # BG/NBD: nobody dies before a repeat purchase; Gamma-Gamma: one-time buyers get the population mean.
    assert (inputs["btyd_p_alive"][one_timers] == 1.0).all()
    np.testing.assert_allclose(inputs["btyd_expected_spend"][one_timers], summary["population_mean_spend"])


def test_p_buy_agrees_with_library_bgnbd(fitted, cdnow_features) -> None:
    """The likelihood-ratio P(no purchase) equals the library's closed form for repeat buyers, and
    the textbook ((alpha+T)/(alpha+T+t))^r for one-time buyers."""
    model, summary, predictions = fitted
    frame = rfm_summary(cdnow_features.eval, model.params.time_unit_days)
    t = model.horizon_days / model.params.time_unit_days
    library = model._transaction.expected_probability_no_purchase(t, frame)
    library = library.mean(("chain", "draw")).to_numpy()
    ours = 1.0 - predictions["p_buy"].to_numpy()
    repeat = frame["frequency"].to_numpy() > 0
    np.testing.assert_allclose(ours[repeat], library[repeat], rtol=1e-6, atol=1e-10)
    T = frame["T"].to_numpy()[~repeat]
    textbook = ((summary["alpha"] + T) / (summary["alpha"] + T + t)) ** summary["r"]
    np.testing.assert_allclose(ours[~repeat], textbook, rtol=1e-8)


def test_pareto_nbd_agrees_with_library(cdnow_features) -> None:
    model = create_model("btyd", {"model": "pareto_nbd"}, cdnow_features.spec, cdnow_features.horizon_days)
    model._set_state(PARETO_STATE)
    sample = cdnow_features.eval.iloc[::20].reset_index(drop=True)
    predictions = model.predict(sample)
    frame = rfm_summary(sample, model.params.time_unit_days)
    t = model.horizon_days / model.params.time_unit_days
    library = model._transaction.expected_purchase_probability(frame, n_purchases=0, future_t=t)
    np.testing.assert_allclose(1.0 - predictions["p_buy"], library.mean(("chain", "draw")).to_numpy(),
                               rtol=1e-6, atol=1e-9)
    assert predictions["p_buy"].between(0, 1).all() and np.isfinite(predictions["expected_value"]).all()


def test_save_load_predicts_identically(fitted, cdnow_features, tmp_path) -> None:
    model, _summary, predictions = fitted
    model.save(tmp_path / "btyd")
    loaded = load_model(tmp_path / "btyd")
    assert isinstance(loaded, BtydModel) and loaded.params == model.params
    pd.testing.assert_frame_equal(loaded.predict(cdnow_features.eval), predictions, check_exact=True)
    pd.testing.assert_frame_equal(loaded.btyd_inputs(cdnow_features.eval), model.btyd_inputs(cdnow_features.eval),
                                  check_exact=True)


def test_recent_frequent_buyer_expects_more(fitted, cdnow_features) -> None:
    model, _summary, _predictions = fitted
    template = cdnow_features.eval.iloc[0]
    base = {"btyd_age_days": 250.0, "tenure_days": 250.0, "monetary_sum": 300.0}
    rows = edited_rows(template, [
        {**base, "btyd_frequency": 10, "purchase_days": 11, "btyd_recency_days": 245.0},  # recent
        {**base, "btyd_frequency": 10, "purchase_days": 11, "btyd_recency_days": 30.0},  # lapsed
        {**base, "btyd_frequency": 2, "purchase_days": 3, "btyd_recency_days": 245.0},  # fewer
    ])
    inputs = model.btyd_inputs(rows)
    predictions = model.predict(rows)
    purchases = inputs["btyd_expected_purchases"].to_numpy()
    assert purchases[0] > purchases[1] and purchases[0] > purchases[2], purchases
    assert inputs["btyd_p_alive"][0] > inputs["btyd_p_alive"][1]
    assert predictions["p_buy"][0] > predictions["p_buy"][1]
    assert predictions["expected_value"][0] > predictions["expected_value"][1]


def test_users_without_purchases(fitted, cdnow_features) -> None:
    """No purchase before the cutoff: frequency 0 with T = days since the first event."""
    model, summary, _predictions = fitted
    template = cdnow_features.eval.iloc[0]
    none = {"btyd_frequency": 0, "purchase_days": 0, "btyd_recency_days": 0.0, "btyd_age_days": 0.0,
            "monetary_sum": 0.0, "monetary_mean": 0.0}
    rows = edited_rows(template, [{**none, "tenure_days": 3.0}, {**none, "tenure_days": 200.0}])
    inputs = model.btyd_inputs(rows)
    predictions = model.predict(rows)
    assert np.isfinite(predictions[["p_buy", "expected_value"]].to_numpy()).all()
    assert predictions["p_buy"][0] > predictions["p_buy"][1] > 0
    np.testing.assert_allclose(inputs["btyd_expected_spend"], summary["population_mean_spend"])


def test_cdnow_sanity(fitted, cdnow_features) -> None:
    _model, _summary, predictions = fitted
    actual = cdnow_features.eval["value"].to_numpy()
    predicted_total, actual_total = predictions["expected_value"].sum(), actual.sum()
    rho = spearmanr(predictions["expected_value"], actual).statistic
    bought = cdnow_features.eval["bought"].to_numpy()
    print(f"\nCDNOW BTYD: predicted total {predicted_total:,.0f} vs actual {actual_total:,.0f} "
          f"(ratio {predicted_total / actual_total:.2f}); spearman {rho:.3f}; "
          f"mean p_buy {predictions['p_buy'].mean():.3f} vs bought {bought.mean():.3f}")
    assert 0.5 < predicted_total / actual_total < 2.0
    assert rho > 0.3
    assert abs(predictions["p_buy"].mean() - bought.mean()) < 0.15


def test_fits_behaviour_logs_with_non_buyers(synthetic_features) -> None:
    """Synthetic logs carry views/carts and users who never bought: they join the fit as
    frequency-0 customers aged from their first event, and everything stays finite."""
    train, evaluation = synthetic_features.train, synthetic_features.eval
    model = create_model("btyd", {}, synthetic_features.spec, synthetic_features.horizon_days)
    summary = model.fit(train, FitContext())
    predictions = model.predict(evaluation)
    non_buyers = evaluation["purchase_days"].to_numpy() == 0
    print(f"\nsynthetic BTYD: {summary}; non-buyers {non_buyers.sum()} of {len(evaluation)}; spearman "
          f"{spearmanr(predictions['expected_value'], evaluation['value']).statistic:.3f}")
    assert np.isfinite(predictions[["p_buy", "expected_value"]].to_numpy()).all()
    assert predictions["p_buy"].between(0, 1).all()
    if non_buyers.any() and (~non_buyers).any():
        assert predictions["p_buy"][non_buyers].mean() < predictions["p_buy"][~non_buyers].mean()


def test_closed_form_bgnbd_equals_the_library(fitted, cdnow_features) -> None:
    """The service's path (bgnbd_outputs on the arrays, numpy and scipy) gives the library's numbers
    for every CDNOW customer, one-time buyers and repeat buyers alike."""
    from uservalue.models.influence import arrays_from_frame

    model, _summary, predictions = fitted
    p_buy, value = model.predict_outputs(arrays_from_frame(cdnow_features.eval, model.spec))
    np.testing.assert_allclose(p_buy, predictions["p_buy"].to_numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(value, predictions["expected_value"].to_numpy(), rtol=1e-9, atol=1e-12)
    one_time = cdnow_features.eval["btyd_frequency"].to_numpy() == 0
    assert 0 < one_time.sum() < len(one_time)  # both branches of the formulas were compared
