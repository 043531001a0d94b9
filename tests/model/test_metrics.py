"""uservalue.lifecycle.metrics against independent references (scipy, sklearn, straightforward re-implementations
of google/lifetime_value's gini and decile stats written here) and against known extremes."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.stats import rankdata, spearmanr
from sklearn.metrics import mean_absolute_error, mean_squared_error, roc_auc_score

from uservalue.lifecycle import metrics
from uservalue.lifecycle.metrics import (
    auc,
    decile_mape,
    decile_table,
    gains_curve,
    mae,
    normalized_gini,
    rmse,
    spearman,
    top_decile_capture,
    total_error,
    value_metrics,
)

# --------------------------------------------------------------------------- references


def lifetime_value_gini(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float, float]:
    """lifetime_value's definition, written out: (raw model, raw perfect, normalized).

    gain = cumsum(y_true sorted by y_pred descending) / sum; raw = 2 * mean(gain) - 1."""
    df = pd.DataFrame({"y_true": y_true, "y_pred": y_pred})
    model = df.sort_values("y_pred", ascending=False)["y_true"]
    perfect = df.sort_values("y_true", ascending=False)["y_true"]
    raws = []
    for column in (model, perfect):
        gain = column.cumsum() / column.sum()
        raws.append(2.0 * gain.sum() / len(gain) - 1.0)
    return raws[0], raws[1], raws[0] / raws[1]


def trapezoid_raw_gini(values_in_order: list[float]) -> float:
    """Raw gini of one fixed ordering by a plain loop: 2 * trapezoid area of the gain polygon
    from (0, 0) - 1."""
    total = sum(values_in_order)
    n = len(values_in_order)
    area, previous, cumulative = 0.0, 0.0, 0.0
    for v in values_in_order:
        cumulative += v / total
        area += (previous + cumulative) / 2.0 / n
        previous = cumulative
    return 2.0 * area - 1.0


def lifetime_value_decile_stats(y_true: np.ndarray, y_pred: np.ndarray) -> pd.DataFrame:
    """lifetime_value's decile_stats (pd.qcut on the predictions), label/pred means per decile."""
    decile = pd.qcut(y_pred, q=10, labels=[str(i) for i in range(10)])
    df = pd.DataFrame({"y_true": y_true, "y_pred": y_pred, "decile": decile})
    out = df.groupby("decile", observed=True).agg(
        n=("y_true", "size"), label_mean=("y_true", "mean"), pred_mean=("y_pred", "mean")
    )
    out["decile_mape"] = (out["pred_mean"] - out["label_mean"]).abs() / out["label_mean"]
    return out


def zero_inflated(rng: np.random.Generator, n: int) -> np.ndarray:
    """Customer-value-like target: most users 0, the rest lognormal."""
    return np.where(rng.random(n) < 0.6, 0.0, rng.lognormal(3.0, 1.0, n))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """1,000 users, a noisy but informative continuous prediction (no ties)."""
    rng = np.random.default_rng(7)
    y_true = zero_inflated(rng, 1000)
    y_pred = y_true * rng.lognormal(0.0, 0.7, 1000) + rng.random(1000) * 5.0
    assert len(np.unique(y_pred)) == 1000
    return y_true, y_pred


# --------------------------------------------------------------------------- gini


def test_gini_matches_lifetime_value_definition_up_to_the_discretisation_term(data) -> None:
    y_true, y_pred = data
    n = len(y_true)
    raw_model, raw_perfect, lv_normalized = lifetime_value_gini(y_true, y_pred)
    ours = normalized_gini(y_true, y_pred)
    # Ours is the trapezoid area: lifetime_value's raw minus 1/n, on both curves.
    assert ours == pytest.approx((raw_model - 1.0 / n) / (raw_perfect - 1.0 / n), rel=1e-10)
    assert abs(ours - lv_normalized) < 2.0 / n
    assert 0.3 < ours < 1.0


def test_gini_loop_reference_without_ties(data) -> None:
    y_true, y_pred = data
    by_pred = [float(v) for v in y_true[np.argsort(-y_pred)]]
    perfect = sorted((float(v) for v in y_true), reverse=True)
    expected = trapezoid_raw_gini(by_pred) / trapezoid_raw_gini(perfect)
    assert normalized_gini(y_true, y_pred) == pytest.approx(expected, rel=1e-10)


def test_gini_with_ties_is_the_average_over_all_tie_break_orders() -> None:
    y_true = np.array([5.0, 0.0, 3.0, 8.0, 1.0, 0.0, 2.0])
    y_pred = np.array([2.0, 2.0, 1.0, 2.0, 0.0, 1.0, 3.0])  # blocks of 3 and 2 tied users
    perfect = trapezoid_raw_gini(sorted(y_true.tolist(), reverse=True))
    raws = []
    for tie_break in itertools.permutations(range(len(y_true))):
        order = sorted(range(len(y_true)), key=lambda i: (-y_pred[i], tie_break[i]))
        raws.append(trapezoid_raw_gini([float(y_true[i]) for i in order]))
    assert normalized_gini(y_true, y_pred) == pytest.approx(np.mean(raws) / perfect, rel=1e-12)


def test_gini_extremes(data) -> None:
    y_true, _ = data
    assert normalized_gini(y_true, y_true) == pytest.approx(1.0, abs=1e-12)
    assert normalized_gini(y_true, np.log1p(y_true) * 3 + 2) == pytest.approx(1.0, abs=1e-12)
    assert normalized_gini(y_true, -y_true) == pytest.approx(-1.0, abs=1e-12)
    assert normalized_gini(y_true, np.zeros_like(y_true)) == pytest.approx(0.0, abs=1e-12)
    assert normalized_gini(y_true, np.full_like(y_true, 42.5)) == pytest.approx(0.0, abs=1e-12)


def test_constant_prediction_is_invariant_to_row_order(data) -> None:
    y_true, _ = data
    rng = np.random.default_rng(1)
    constant = np.ones_like(y_true)
    base_gini = normalized_gini(y_true, constant)
    base_top = top_decile_capture(y_true, constant)
    assert base_top == pytest.approx(0.1, abs=1e-12)  # everyone tied: exactly a tenth of value
    for _ in range(3):
        perm = rng.permutation(len(y_true))
        assert normalized_gini(y_true[perm], constant) == pytest.approx(base_gini, abs=1e-12)
        assert top_decile_capture(y_true[perm], constant) == pytest.approx(base_top, abs=1e-12)


def test_gini_undefined_cases_are_nan() -> None:
    assert math.isnan(normalized_gini([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]))  # no value at all
    assert math.isnan(normalized_gini([4.0, 4.0, 4.0], [1.0, 2.0, 3.0]))  # nothing to rank
    assert math.isnan(normalized_gini([4.0], [1.0]))


# --------------------------------------------------------------------------- top decile, gains


def test_top_decile_capture_perfect_ranking_is_true_top_share(data) -> None:
    y_true, y_pred = data
    top_share = np.sort(y_true)[::-1][:100].sum() / y_true.sum()
    assert top_decile_capture(y_true, y_true) == pytest.approx(top_share, rel=1e-12)
    model_top = y_true[np.argsort(-y_pred)][:100].sum() / y_true.sum()
    assert top_decile_capture(y_true, y_pred) == pytest.approx(model_top, rel=1e-12)


def test_top_decile_capture_splits_a_straddling_tie_block_proportionally() -> None:
    # 20 users: cut at 2. One clear top user, then 4 tied users of which 1 "slot" is inside.
    y_true = np.array([10.0, 1.0, 2.0, 3.0, 6.0] + [1.0] * 15)
    y_pred = np.array([9.0, 5.0, 5.0, 5.0, 5.0] + [0.0] * 15)
    expected = (10.0 + np.mean([1.0, 2.0, 3.0, 6.0])) / y_true.sum()
    assert top_decile_capture(y_true, y_pred) == pytest.approx(expected, rel=1e-12)
    # n not a multiple of 10: the cut at 0.7 users takes 0.7 of the top user.
    assert top_decile_capture([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 10.0], [1, 2, 3, 4, 5, 6, 7]) == (
        pytest.approx(0.7 * 10.0 / 20.0, rel=1e-12)
    )


def test_gains_curve(data) -> None:
    y_true, y_pred = data
    curve = gains_curve(y_true, y_pred)
    assert list(curve.columns) == ["fraction_users", "fraction_value"]
    assert len(curve) == 101
    assert curve["fraction_users"].iloc[0] == 0.0 and curve["fraction_users"].iloc[-1] == 1.0
    assert curve["fraction_value"].iloc[0] == 0.0
    assert curve["fraction_value"].iloc[-1] == pytest.approx(1.0, abs=1e-12)
    assert (np.diff(curve["fraction_value"]) >= -1e-12).all()  # non-negative values: monotone
    assert curve["fraction_value"].iloc[10] == pytest.approx(top_decile_capture(y_true, y_pred))
    best = gains_curve(y_true, y_true, points=11)["fraction_value"].to_numpy()
    assert (best + 1e-12 >= curve["fraction_value"].to_numpy()[::10]).all()
    flat = gains_curve(y_true, np.zeros_like(y_true), points=5)["fraction_value"]
    assert flat.to_numpy() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0], abs=1e-12)


# --------------------------------------------------------------------------- deciles


def test_decile_table_matches_lifetime_value_decile_stats_without_ties(data) -> None:
    y_true, y_pred = data
    ours = decile_table(y_true, y_pred)
    reference = lifetime_value_decile_stats(y_true, y_pred)
    assert list(ours.columns) == ["decile", "n", "mean_actual", "mean_predicted"]
    assert ours["decile"].tolist() == list(range(10))
    assert ours["n"].tolist() == reference["n"].tolist() == [100] * 10
    np.testing.assert_allclose(ours["mean_actual"], reference["label_mean"], rtol=1e-12)
    np.testing.assert_allclose(ours["mean_predicted"], reference["pred_mean"], rtol=1e-12)
    positive = reference[reference["label_mean"] > 0]  # lifetime_value gives inf for the others
    assert 0 < len(positive) < 10
    assert decile_mape(y_true, y_pred) == pytest.approx(positive["decile_mape"].mean(), rel=1e-12)


def test_decile_table_ties_give_equal_groups_broken_by_row_order() -> None:
    y_true = np.arange(20, dtype=float)
    table = decile_table(y_true, np.zeros(20))  # pd.qcut would fail on these duplicate edges
    assert table["n"].tolist() == [2] * 10
    assert table["mean_actual"].tolist() == [2 * d + 0.5 for d in range(10)]
    uneven = decile_table(np.ones(23), np.ones(23))
    assert uneven["n"].sum() == 23 and set(uneven["n"]) == {2, 3}
    small = decile_table([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])  # fewer users than deciles
    assert small["decile"].tolist() == [0, 3, 6]
    assert small["mean_actual"].tolist() == [3.0, 2.0, 1.0]


@pytest.mark.parametrize("n", [1000, 1003])
def test_decile_mape_zero_when_predictions_are_decile_means(n: int) -> None:
    rng = np.random.default_rng(n)
    y_true = rng.permutation(np.arange(n, dtype=float)) + 1.0
    decile = (rankdata(y_true, method="ordinal").astype(int) - 1) * 10 // n
    means = pd.Series(y_true).groupby(decile).transform("mean").to_numpy()
    assert decile_mape(y_true, means) == pytest.approx(0.0, abs=1e-12)
    table = decile_table(y_true, means)
    np.testing.assert_allclose(table["mean_predicted"], table["mean_actual"], rtol=1e-12)


def test_decile_mape_skips_zero_value_deciles() -> None:
    y_true = np.r_[np.zeros(90), np.full(10, 10.0)]
    y_pred = np.r_[np.linspace(0, 1, 90), np.full(10, 12.0)]
    assert decile_mape(y_true, y_pred) == pytest.approx(0.2)  # only the top decile counts
    assert math.isnan(decile_mape(np.zeros(10), np.arange(10.0)))


# --------------------------------------------------------------------------- point errors, total


def test_mae_rmse_match_sklearn(data) -> None:
    y_true, y_pred = data
    assert mae(y_true, y_pred) == pytest.approx(mean_absolute_error(y_true, y_pred), rel=1e-12)
    assert rmse(y_true, y_pred) == pytest.approx(
        math.sqrt(mean_squared_error(y_true, y_pred)), rel=1e-12
    )


def test_total_error_known_values() -> None:
    assert total_error([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == 0.0
    assert total_error([1.0, 1.0], [3.0, 3.0]) == pytest.approx(2.0)
    assert total_error([4.0, 6.0], [0.0, 0.0]) == pytest.approx(-1.0)
    assert total_error([4.0, 6.0], [5.0, 6.0]) == pytest.approx(0.1)
    assert math.isnan(total_error([0.0, 0.0], [1.0, 1.0]))


# --------------------------------------------------------------------------- spearman, auc


def test_spearman_matches_scipy_with_and_without_ties(data) -> None:
    y_true, y_pred = data  # y_true has 60% zeros: heavy ties
    assert spearman(y_true, y_pred) == pytest.approx(spearmanr(y_true, y_pred)[0], rel=1e-10)
    rounded = np.round(y_pred / 10.0)
    assert spearman(y_true, rounded) == pytest.approx(spearmanr(y_true, rounded)[0], rel=1e-10)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))


def test_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    bought = rng.random(2000) < 0.3
    score = np.round(np.clip(0.3 + 0.3 * bought + rng.normal(0, 0.25, 2000), 0, 1), 1)  # ties
    assert auc(bought, score) == pytest.approx(roc_auc_score(bought, score), rel=1e-12)
    assert auc(bought.astype(int), score) == pytest.approx(roc_auc_score(bought, score), rel=1e-12)
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))


# --------------------------------------------------------------------------- value_metrics


def test_value_metrics_keys_types_and_consistency(data) -> None:
    y_true, y_pred = data
    bought = y_true > 0
    p_buy = 1.0 - np.exp(-y_pred / 20.0)
    result = value_metrics(y_true, y_pred, bought, p_buy)
    assert list(result) == [
        "gini", "spearman", "mae", "rmse", "top_decile_capture", "decile_mape", "total_error", "auc",
    ]
    assert all(type(v) is float for v in result.values())
    json.dumps(result)
    assert result["gini"] == pytest.approx(normalized_gini(y_true, y_pred), rel=1e-12)
    assert result["spearman"] == pytest.approx(spearman(y_true, y_pred), rel=1e-12)
    assert result["mae"] == pytest.approx(mae(y_true, y_pred), rel=1e-12)
    assert result["rmse"] == pytest.approx(rmse(y_true, y_pred), rel=1e-12)
    assert result["top_decile_capture"] == pytest.approx(top_decile_capture(y_true, y_pred))
    assert result["decile_mape"] == pytest.approx(decile_mape(y_true, y_pred), rel=1e-12)
    assert result["total_error"] == pytest.approx(total_error(y_true, y_pred), rel=1e-12)
    assert result["auc"] == pytest.approx(roc_auc_score(bought, p_buy), rel=1e-12)


# --------------------------------------------------------------------------- properties

values = st.lists(st.integers(0, 50) | st.floats(0, 1e4), min_size=2, max_size=60)


@st.composite
def true_and_pred(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.array(draw(values), dtype=float)
    y_pred = np.array(draw(st.lists(st.integers(-5, 5), min_size=len(y_true),
                                    max_size=len(y_true))), dtype=float)  # small ints: many ties
    assume(y_true.sum() > 0 and np.ptp(y_true) > 0)
    return y_true, y_pred


@settings(max_examples=150, deadline=None)
@given(true_and_pred())
def test_gini_bounded_and_invariant_to_monotone_transforms(pair) -> None:
    y_true, y_pred = pair
    g = normalized_gini(y_true, y_pred)
    assert -1.0 - 1e-9 <= g <= 1.0 + 1e-9
    for transformed in (3.0 * y_pred + 7.0, y_pred**3, np.exp(y_pred), rankdata(y_pred)):
        assert normalized_gini(y_true, transformed) == pytest.approx(g, abs=1e-12)
    top = top_decile_capture(y_true, y_pred)
    assert -1e-12 <= top <= 1.0 + 1e-12


@settings(max_examples=100, deadline=None)
@given(true_and_pred(), st.randoms(use_true_random=False))
def test_metrics_invariant_to_row_permutation(pair, rnd) -> None:
    y_true, y_pred = pair
    perm = np.array(rnd.sample(range(len(y_true)), len(y_true)))
    for metric in (normalized_gini, top_decile_capture, spearman):
        assert metric(y_true[perm], y_pred[perm]) == pytest.approx(
            metric(y_true, y_pred), abs=1e-12, nan_ok=True
        )


@settings(max_examples=100, deadline=None)
@given(true_and_pred())
def test_spearman_and_auc_match_references_on_random_ties(pair) -> None:
    y_true, y_pred = pair
    assume(np.ptp(y_pred) > 0)
    assert spearman(y_true, y_pred) == pytest.approx(spearmanr(y_true, y_pred)[0], abs=1e-9)
    bought = y_true > np.median(y_true)
    assume(0 < bought.sum() < len(bought))
    assert auc(bought, y_pred) == pytest.approx(roc_auc_score(bought, y_pred), abs=1e-12)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: normalized_gini([1.0, 2.0], [1.0, 2.0, 3.0]), "y_pred"),
        (lambda: normalized_gini([1.0, 2.0, 3.0], [1.0, 2.0]), "y_true"),
        (lambda: mae([], []), "y_true"),
        (lambda: rmse([1.0, 2.0], [1.0, float("nan")]), "y_pred"),
        (lambda: spearman([1.0, 2.0], [float("inf"), 1.0]), "y_pred"),
        (lambda: top_decile_capture([float("nan"), 1.0], [1.0, 2.0]), "y_true"),
        (lambda: decile_table([[1.0, 2.0]], [[1.0, 2.0]]), "y_true"),
        (lambda: total_error(["a", "b"], [1.0, 2.0]), "y_true"),
        (lambda: auc([0, 1, 2], [0.1, 0.2, 0.3]), "bought"),
        (lambda: auc([0, 1], [0.1, float("nan")]), "p_buy"),
        (lambda: auc([0, 1], [0.1, 0.2, 0.3]), "p_buy"),
        (lambda: gains_curve([1.0, 2.0], [1.0, 2.0], points=1), "points"),
        (lambda: value_metrics([1.0, 2.0], [1.0, 2.0], [0, 1], [0.5]), "p_buy"),
        (lambda: value_metrics([1.0, 2.0], [1.0, 2.0], [0, 1, 1], [0.5, 0.5]), "bought"),
    ],
)
def test_bad_input_raises_value_error_naming_the_argument(call, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        call()


def test_public_api() -> None:
    assert set(metrics.__all__) == {
        "auc", "decile_mape", "decile_table", "gains_curve", "mae", "normalized_gini", "rmse", "score",
        "spearman", "top_decile_capture", "total_error", "value_metrics",
    }


def test_score_orders_every_metric_higher_is_better() -> None:
    from uservalue.config import METRICS

    assert set(metrics.VALUE_METRIC_KEYS) == set(METRICS)
    for name, higher_is_better in METRICS.items():
        if name == "total_error":  # closeness to 0, whatever the sign
            assert metrics.score(name, -0.01) > metrics.score(name, 0.05) == metrics.score(name, -0.05)
        else:
            assert (metrics.score(name, 0.6) > metrics.score(name, 0.5)) is higher_is_better
        assert metrics.score(name, float("nan")) == float("-inf")
