"""Metrics of value predictions (ranking, calibration, point error, purchase AUC), tested against
scipy/scikit-learn; why they differ from google/lifetime_value's in ties and the Gini: docs/metrics.md."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from uservalue.config import METRICS

__all__ = [
    "auc",
    "decile_mape",
    "decile_table",
    "gains_curve",
    "mae",
    "normalized_gini",
    "rmse",
    "score",
    "spearman",
    "top_decile_capture",
    "total_error",
    "value_metrics",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

N_DECILES = 10
VALUE_METRIC_KEYS = tuple(METRICS)


def score(metric: str, value: float | None) -> float:
    """The metric as a score where higher is better for every metric (total_error: closeness to 0)."""
    if value is None or math.isnan(value):
        return -math.inf
    if metric == "total_error":
        return -abs(value)
    return value if METRICS[metric] else -value


# --------------------------------------------------------------------------- input validation


def _as_vector(value: npt.ArrayLike, name: str) -> FloatArray:
    """A 1-D finite float64 copy-or-view of `value`; errors name the argument so a caller with
    several arrays in flight knows which one is wrong."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: metrics need at least one user")
    bad = ~np.isfinite(arr)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s) (NaN/inf), first at index {first}"
        )
    return arr


def _as_binary(value: npt.ArrayLike, name: str) -> npt.NDArray[np.bool_]:
    """A 1-D boolean vector from bools or 0/1 numbers; anything else is an error, because a
    silently thresholded label would make the AUC meaningless."""
    arr = _as_vector(value, name)
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1)")
    return arr == 1.0


def _same_length(**arrays: np.ndarray) -> None:
    """Reject vectors of different lengths, naming them, before any metric pairs rows up."""
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise ValueError(f"inputs must have equal lengths: {detail}")


def _pair(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    t = _as_vector(y_true, "y_true")
    p = _as_vector(y_pred, "y_pred")
    _same_length(y_true=t, y_pred=p)
    return t, p


# --------------------------------------------------------------------------- one sort, reused


@dataclass(frozen=True)
class _Sorted:
    """One stable ascending sort of a vector and its tie blocks.

    Every rank-based metric needs exactly this, so `value_metrics` builds it once per vector and
    hands it to each metric instead of sorting 10^6 values again for every number it reports.
    """

    order: IntArray  # positions of the values in ascending order; ties keep the original order
    starts: IntArray  # first sorted position of each block of equal values
    sizes: IntArray  # length of each block

    @classmethod
    def of(cls, x: FloatArray) -> _Sorted:
        order = np.argsort(x, kind="stable").astype(np.int64, copy=False)
        xs = x[order]
        new_block = np.empty(xs.size, dtype=bool)
        new_block[0] = True
        np.not_equal(xs[1:], xs[:-1], out=new_block[1:])
        starts = np.flatnonzero(new_block).astype(np.int64, copy=False)
        sizes = np.diff(np.append(starts, xs.size))
        return cls(order=order, starts=starts, sizes=sizes)

    @property
    def n(self) -> int:
        return int(self.order.size)

    def average_ranks(self) -> FloatArray:
        """1-based ranks in the original row order, ties sharing the mean of their ranks."""
        block_rank = self.starts + (self.sizes + 1) / 2.0
        ranks = np.empty(self.n, dtype=np.float64)
        ranks[self.order] = np.repeat(block_rank, self.sizes)
        return ranks

    def spread_ascending(self, values: FloatArray) -> FloatArray:
        """`values` in ascending order of the sorted key, each tie block's total shared evenly
        among its members — the expected per-position value over all orders inside the block."""
        block_sums = np.add.reduceat(values[self.order], self.starts)
        return np.repeat(block_sums / self.sizes, self.sizes)


def _cumulative_gain(y_true: FloatArray, by_pred: _Sorted) -> FloatArray:
    """Cumulative actual value (not yet normalised) after the top k users by prediction,
    k = 0..n; element 0 is 0 so the curve is the polygon from (0, 0) to (n, total)."""
    spread_desc = by_pred.spread_ascending(y_true)[::-1]
    curve = np.empty(y_true.size + 1, dtype=np.float64)
    curve[0] = 0.0
    np.cumsum(spread_desc, out=curve[1:])
    return curve


def _raw_gini(curve: FloatArray) -> float:
    """2 * (area under the normalised gain polygon) - 1, NaN when the total value is not positive.

    Trapezoid area = (sum(curve[1:]) + sum(curve[:-1])) / (2 n total); see the module docstring
    for why this, not lifetime_value's mean of right end points."""
    n = curve.size - 1
    total = float(curve[-1])
    if not total > 0.0:
        return float("nan")
    inner = float(curve[1:-1].sum())
    area = (2.0 * inner + total) / (2.0 * n * total)
    return 2.0 * area - 1.0


def _gini(y_true: FloatArray, by_pred: _Sorted, true_ascending: FloatArray) -> float:
    """Normalized Gini; `true_ascending` is y_true sorted (the perfect ordering reversed), passed
    in so a caller that already sorted y_true does not sort it again."""
    raw_model = _raw_gini(_cumulative_gain(y_true, by_pred))
    perfect = np.empty(y_true.size + 1, dtype=np.float64)
    perfect[0] = 0.0
    # Ties in y_true are equal values, so the perfect curve needs no spreading.
    np.cumsum(true_ascending[::-1], out=perfect[1:])
    raw_perfect = _raw_gini(perfect)
    if not raw_perfect > 0.0:  # every user has the same value: no ordering is better than another
        return float("nan")
    return raw_model / raw_perfect


def _gain_at(curve: FloatArray, fractions: FloatArray) -> FloatArray:
    """Share of total value held by the top `fractions` of users; fractional user counts are
    interpolated along the polygon, so a tie block (or a single user) straddling the cut counts
    proportionally."""
    n = curve.size - 1
    total = float(curve[-1])
    if not total > 0.0:
        return np.full(fractions.shape, np.nan)
    return np.interp(fractions * n, np.arange(n + 1, dtype=np.float64), curve) / total


def _spearman(ranks_true: FloatArray, ranks_pred: FloatArray) -> float:
    a = ranks_true - ranks_true.mean()
    b = ranks_pred - ranks_pred.mean()
    denom = float(np.sqrt(np.dot(a, a) * np.dot(b, b)))
    if denom == 0.0:  # a constant vector has no ranking to correlate with
        return float("nan")
    return float(np.clip(np.dot(a, b) / denom, -1.0, 1.0))


def _decile_table(y_true: FloatArray, y_pred: FloatArray, by_pred: _Sorted) -> pd.DataFrame:
    n = y_true.size
    decile = np.empty(n, dtype=np.int64)
    decile[by_pred.order] = (np.arange(n, dtype=np.int64) * N_DECILES) // n
    counts = np.bincount(decile, minlength=N_DECILES)
    sum_true = np.bincount(decile, weights=y_true, minlength=N_DECILES)
    sum_pred = np.bincount(decile, weights=y_pred, minlength=N_DECILES)
    keep = counts > 0  # only when n < 10
    return pd.DataFrame(
        {
            "decile": np.arange(N_DECILES, dtype=np.int64)[keep],
            "n": counts[keep].astype(np.int64),
            "mean_actual": sum_true[keep] / counts[keep],
            "mean_predicted": sum_pred[keep] / counts[keep],
        }
    )


def _decile_mape(table: pd.DataFrame) -> float:
    actual = table["mean_actual"].to_numpy()
    predicted = table["mean_predicted"].to_numpy()
    usable = actual > 0.0
    if not usable.any():
        return float("nan")
    return float(np.mean(np.abs(predicted[usable] - actual[usable]) / actual[usable]))


def _auc(bought: npt.NDArray[np.bool_], by_score: _Sorted) -> float:
    n_pos = int(bought.sum())
    n_neg = bought.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = float(by_score.average_ranks()[bought].sum())
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _total_error(y_true: FloatArray, y_pred: FloatArray) -> float:
    total = float(y_true.sum())
    if total == 0.0:
        return float("nan")
    return float(y_pred.sum()) / total - 1.0


# --------------------------------------------------------------------------- public metrics


def normalized_gini(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Normalized Gini of `y_pred` as a ranking of `y_true` (lifetime_value's headline metric).

    Gain curve: the cumulative share of actual value when users are sorted by prediction,
    highest first, with each tie block's value spread evenly. Raw Gini = 2 * area under that
    curve - 1 (trapezoid rule, see the module docstring); normalised by the raw Gini of the
    perfect ordering (by `y_true` itself). So 1 = perfect ranking, 0 = no information (a
    constant prediction gives exactly 0), -1 = exactly reversed. Invariant to any strictly
    increasing transform of `y_pred` and to row order. NaN when the total value is not positive
    or every user has the same value (nothing to rank).
    """
    t, p = _pair(y_true, y_pred)
    return _gini(t, _Sorted.of(p), np.sort(t))


def spearman(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Spearman rank correlation (Pearson on average ranks, so ties are handled like
    scipy.stats.spearmanr). NaN when either input is constant."""
    t, p = _pair(y_true, y_pred)
    return _spearman(_Sorted.of(t).average_ranks(), _Sorted.of(p).average_ranks())


def mae(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Mean absolute error, in value units."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(np.abs(p - t)))


def rmse(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Root mean squared error, in value units (dominated by the heavy tail of big spenders)."""
    t, p = _pair(y_true, y_pred)
    return float(np.sqrt(np.mean(np.square(p - t))))


def top_decile_capture(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Share of the total actual value held by the top 10% of users by prediction.

    What a campaign targeting the predicted top decile would reach. The cut is at exactly
    n / 10 users: a tie block (or one user, when n is not a multiple of 10) straddling it
    contributes in proportion to the part inside. NaN when the total value is not positive.
    """
    t, p = _pair(y_true, y_pred)
    curve = _cumulative_gain(t, _Sorted.of(p))
    return float(_gain_at(curve, np.array([0.1]))[0])


def decile_table(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> pd.DataFrame:
    """Per-decile calibration chart: columns decile (0 = lowest predictions .. 9 = highest), n,
    mean_actual, mean_predicted.

    Deciles are cut on prediction *rank*: user at ascending position i (0-based) goes to decile
    floor(10 i / n), so the groups differ in size by at most one even when most predictions are
    equal. Ties are broken by the original row order (stable sort) — the only way to split a
    tie block into equal groups; it moves users between adjacent deciles only. With fewer than
    10 users the empty deciles are left out.
    """
    t, p = _pair(y_true, y_pred)
    return _decile_table(t, p, _Sorted.of(p))


def decile_mape(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Mean over deciles of |mean_predicted - mean_actual| / mean_actual (lifetime_value's
    decile MAPE), over the deciles of `decile_table` whose mean_actual > 0 — a relative error
    against zero is undefined, and low deciles of a zero-inflated target are often all zero.
    NaN if no decile has positive mean actual value."""
    t, p = _pair(y_true, y_pred)
    return _decile_mape(_decile_table(t, p, _Sorted.of(p)))


def total_error(y_true: npt.ArrayLike, y_pred: npt.ArrayLike) -> float:
    """Relative error of the predicted total: sum(y_pred) / sum(y_true) - 1 (0 = the total is
    right, +0.1 = 10% over-forecast). NaN when the actual total is 0."""
    t, p = _pair(y_true, y_pred)
    return _total_error(t, p)


def auc(bought: npt.ArrayLike, p_buy: npt.ArrayLike) -> float:
    """ROC AUC of `p_buy` for the binary `bought` (any purchase in the holdout).

    Computed as the Mann-Whitney U statistic from average ranks, so a tied positive/negative
    pair counts 1/2 and the sort is O(n log n). NaN when only one class is present.
    """
    b = _as_binary(bought, "bought")
    s = _as_vector(p_buy, "p_buy")
    _same_length(bought=b, p_buy=s)
    return _auc(b, _Sorted.of(s))


def gains_curve(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, points: int = 101) -> pd.DataFrame:
    """The gain chart for plotting: columns fraction_users (evenly spaced 0..1, `points` rows)
    and fraction_value (share of total actual value held by that top fraction by prediction),
    with the same tie handling as `normalized_gini` and `top_decile_capture`."""
    if isinstance(points, bool) or not isinstance(points, int | np.integer) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}")
    t, p = _pair(y_true, y_pred)
    curve = _cumulative_gain(t, _Sorted.of(p))
    fractions = np.linspace(0.0, 1.0, int(points))
    return pd.DataFrame({"fraction_users": fractions, "fraction_value": _gain_at(curve, fractions)})


def value_metrics(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    bought: npt.ArrayLike,
    p_buy: npt.ArrayLike,
) -> dict[str, float]:
    """All headline metrics of one evaluation as plain floats (ready for MLflow / JSON; a metric
    that is undefined for the data is NaN). Keys: gini, spearman, mae, rmse,
    top_decile_capture, decile_mape, total_error, auc.

    Each vector is sorted once and the sort shared, so this costs about three sorts in all.
    """
    t, p = _pair(y_true, y_pred)
    b = _as_binary(bought, "bought")
    s = _as_vector(p_buy, "p_buy")
    _same_length(y_true=t, y_pred=p, bought=b, p_buy=s)

    by_pred = _Sorted.of(p)
    by_true = _Sorted.of(t)
    curve = _cumulative_gain(t, by_pred)  # shared by top_decile_capture (gini rebuilds it: cheap)
    result = {
        "gini": _gini(t, by_pred, t[by_true.order]),
        "spearman": _spearman(by_true.average_ranks(), by_pred.average_ranks()),
        "mae": float(np.mean(np.abs(p - t))),
        "rmse": float(np.sqrt(np.mean(np.square(p - t)))),
        "top_decile_capture": float(_gain_at(curve, np.array([0.1]))[0]),
        "decile_mape": _decile_mape(_decile_table(t, p, by_pred)),
        "total_error": _total_error(t, p),
        "auc": _auc(b, _Sorted.of(s)),
    }
    return {key: float(result[key]) for key in VALUE_METRIC_KEYS}
