"""BTYD: BG/NBD or Pareto/NBD purchase counts x Gamma-Gamma spend, from pymc-marketing; this module
maps feature columns to the library's RFM summary and back (docs/models-baselines.md)."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from uservalue.errors import InputError, UservalueError
from uservalue.features.online import FeatureArrays
from uservalue.features.sql import FeatureSpec
from uservalue.models.base import FitContext, ModelParams, ValueModel, aggregate_matrix

STATE_FILE = "btyd.json"
TRANSACTION_PARAMS = {"bgnbd": ("r", "alpha", "a", "b"), "pareto_nbd": ("r", "alpha", "s", "beta")}
SPEND_PARAMS = ("p", "q", "v")
RFM_COLUMNS = ["btyd_frequency", "btyd_recency_days", "btyd_age_days", "purchase_days",
               "tenure_days", "monetary_sum"]
INPUT_COLUMNS = ("btyd_p_alive", "btyd_expected_purchases", "btyd_expected_spend")


class BtydParams(ModelParams):
    model: Literal["bgnbd", "pareto_nbd"] = "bgnbd"
    time_unit_days: float = Field(7.0, gt=0, description="fit in this time unit (7 = weeks)")
    fit_method: Literal["map"] = "map"
    maxeval: int = Field(5000, ge=100, description="most likelihood evaluations of the MAP fit")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No warnings (ArviZ's refactor notice, PyTensor's BLAS notice) and no PyMC log lines."""
    loggers = [logging.getLogger(name) for name in ("pymc", "pytensor", "pymc_marketing")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _clv() -> Any:
    with _quiet():
        from pymc_marketing import clv
    return clv


def rfm_summary(features: pd.DataFrame, time_unit_days: float) -> pd.DataFrame:
    """The library's per-customer summary (customer_id = row position, so repeated user ids at
    several cutoffs are fine): frequency, recency, T (in time units) and monetary_value. On a log with
    returns (a `return_amount_sum` column) the spend is net of them, like the labels."""
    returned = (aggregate_matrix(features, ["return_amount_sum"])[:, 0]
                if "return_amount_sum" in features.columns else None)
    return pd.DataFrame({"customer_id": np.arange(len(features)),
                         **rfm_arrays(aggregate_matrix(features, RFM_COLUMNS), returned, time_unit_days)})


def rfm_arrays(rfm: np.ndarray, returned: np.ndarray | None, time_unit_days: float) -> dict[str, np.ndarray]:
    """rfm_summary's columns from the RFM_COLUMNS matrix (and the returned amounts, when the log has
    returns): the one mapping the DataFrame and the array paths share."""
    frequency, recency, age, purchase_days, tenure, spend = np.nan_to_num(rfm).T
    if returned is not None:
        spend = np.maximum(spend - np.nan_to_num(returned), 0.0)
    buyer = purchase_days > 0
    recency = np.where(buyer, recency, 0.0) / time_unit_days
    T = np.maximum(np.where(buyer, age, tenure) / time_unit_days, recency)
    return {
        "frequency": np.where(buyer, np.maximum(frequency, 0.0), 0.0),
        "recency": recency,
        "T": T,
        "monetary_value": np.where(buyer, spend / np.maximum(purchase_days, 1.0), 0.0),
    }


def bgnbd_outputs(theta: dict[str, float], spend: dict[str, float], rfm: dict[str, np.ndarray],
                  t: float) -> tuple[np.ndarray, np.ndarray]:
    """(P(at least one purchase within t), expected purchases within t x Gamma-Gamma expected spend)
    of BG/NBD in closed form (Fader, Hardie and Lee 2005; Fader and Hardie 2013), with numpy and
    scipy only: the service's path. The library evaluates the same formulas through xarray and a
    compiled PyTensor graph at ~30 ms a call; tests hold the two equal.

    P(no purchase in (T, T + t]) is the likelihood ratio L(x, t_x, T + t) / L(x, t_x, T) the batch
    path takes from the library's log-likelihood; its Gamma and Beta factors cancel, leaving
    [(alpha + T + t)^-(r + x) + [x > 0] a / (b + x - 1) (alpha + t_x)^-(r + x)] over the same at T."""
    from scipy.special import hyp2f1

    r, alpha, a, b = (theta[k] for k in TRANSACTION_PARAMS["bgnbd"])
    x, t_x, T = rfm["frequency"], rfm["recency"], rfm["T"]
    repeat = x > 0
    # a / (b + x - 1) is only read where x > 0 (b + x - 1 may be <= 0 at x = 0).
    weight = np.where(repeat, a / np.where(repeat, b + x - 1.0, 1.0), 0.0)
    dropout = weight * ((alpha + T) / (alpha + t_x)) ** (r + x)  # (alpha + T)^(r+x) x the x > 0 term
    later = ((alpha + T) / (alpha + T + t)) ** (r + x)
    p_none = np.minimum((later + dropout) / (1.0 + dropout), 1.0)
    purchases = ((a + b + x - 1.0) / (a - 1.0)
                 * (1.0 - later * hyp2f1(r + x, b + x, a + b + x - 1.0, t / (alpha + T + t)))
                 / (1.0 + dropout))
    p, q, v = (spend[k] for k in SPEND_PARAMS)
    individual = p * x / (p * x + q - 1.0)
    per_purchase = (1.0 - individual) * (v * p / (q - 1.0)) + individual * rfm["monetary_value"]
    return 1.0 - p_none, purchases * per_purchase


def _point(values: Any, ids: np.ndarray) -> np.ndarray:
    """A library result (chain, draw, customer_id) as one value per customer, in `ids` order."""
    return values.mean(("chain", "draw")).sel(customer_id=ids).to_numpy().astype(np.float64)


def _idata(values: dict[str, float]) -> Any:
    """A one-draw posterior holding point values: what a MAP fit leaves in `model.idata`."""
    import arviz as az

    with _quiet():
        return az.from_dict(posterior={k: np.array([[v]], dtype=np.float64) for k, v in values.items()})


class BtydModel(ValueModel):
    """expected_value = expected purchases over the horizon (BG/NBD or Pareto/NBD) x Gamma-Gamma
    expected spend per purchase; p_buy = P(at least one purchase within the horizon)."""

    name = "btyd"
    behavior_aware = False  # purchases only: every prediction owed to the purchase history
    Params = BtydParams

    def __init__(self, params: BtydParams, spec: FeatureSpec, horizon_days: int) -> None:
        super().__init__(params, spec, horizon_days)
        self._state: dict[str, dict[str, float]] | None = None
        self._transaction: Any = None  # the library's BetaGeoModel / ParetoNBDModel, fitted values
        self._spend: Any = None  # the library's GammaGammaModel, fitted values
        self._logp: Any = None  # compiled log-likelihood of (recency, frequency) given T

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, train: pd.DataFrame, ctx: FitContext) -> dict[str, float]:
        if "cutoff" in train.columns and len(train):
            train = train[train["cutoff"] == train["cutoff"].max()]
        summary = rfm_summary(train, self.params.time_unit_days)
        if len(summary) == 0:
            raise InputError("features", "no training rows to fit the BTYD model on")
        # Gamma-Gamma conditions on repeat buyers with a positive mean spend.
        repeat = summary[(summary["frequency"] > 0) & (summary["monetary_value"] > 0)]
        if len(repeat) < 2:
            raise InputError("features", "the Gamma-Gamma spend model needs users with repeat purchases "
                             "before the latest training cutoff", found=len(repeat))
        clv = _clv()
        transaction_class = clv.BetaGeoModel if self.params.model == "bgnbd" else clv.ParetoNBDModel
        fit_kwargs = {"method": self.params.fit_method, "progressbar": False, "seed": ctx.seed,
                      "maxeval": self.params.maxeval}
        with _quiet():
            transaction = transaction_class(summary[["customer_id", "frequency", "recency", "T"]])
            transaction.fit(**fit_kwargs)
            spend = clv.GammaGammaModel(repeat[["customer_id", "frequency", "monetary_value"]])
            spend.fit(**fit_kwargs)
        state = {
            "transaction": {k: float(transaction.fit_result[k].to_numpy().ravel()[0])
                            for k in TRANSACTION_PARAMS[self.params.model]},
            "spend": {k: float(spend.fit_result[k].to_numpy().ravel()[0]) for k in SPEND_PARAMS},
        }
        self._set_state(state)
        return {
            **state["transaction"],
            **state["spend"],
            "population_mean_spend": self._population_mean_spend(),
            "n_customers": float(len(summary)),
            "n_repeat_customers": float(len(repeat)),
        }

    def _population_mean_spend(self) -> float:
        p, q, v = (self._state["spend"][k] for k in SPEND_PARAMS)
        return p * v / (q - 1.0)

    def _set_state(self, state: dict[str, dict[str, float]]) -> None:
        """Rebuild the library models from point values (after a fit and after a load alike, so a
        loaded model predicts with exactly the code path and numbers of the fitted one)."""
        missing = set(TRANSACTION_PARAMS[self.params.model]) - set(state["transaction"])
        missing |= set(SPEND_PARAMS) - set(state["spend"])
        if missing:
            raise InputError(STATE_FILE, f"missing fitted parameters {sorted(missing)}")
        if state["spend"]["q"] <= 1.0:
            raise UservalueError(
                f"btyd: the Gamma-Gamma fit has q = {state['spend']['q']:.3g} <= 1, so spend has no "
                "finite population mean; the spend data is too heavy-tailed for this model"
            )
        clv = _clv()
        # The library models need data to exist; predictions take the customers as arguments, so
        # one placeholder customer is enough (no refit: the posterior is the saved point values).
        placeholder = pd.DataFrame({"customer_id": [0], "frequency": [1.0], "recency": [1.0],
                                    "T": [2.0], "monetary_value": [1.0]})
        transaction_class = clv.BetaGeoModel if self.params.model == "bgnbd" else clv.ParetoNBDModel
        with _quiet():
            transaction = transaction_class(placeholder[["customer_id", "frequency", "recency", "T"]])
            transaction.build_model()
            transaction.idata = _idata(state["transaction"])
            spend = clv.GammaGammaModel(placeholder[["customer_id", "frequency", "monetary_value"]])
            spend.idata = _idata(state["spend"])
        self._state, self._transaction, self._spend, self._logp = state, transaction, spend, None

    def _fitted(self) -> None:
        if self._state is None:
            raise UservalueError("btyd: the model is not fitted; call fit() or load a saved model")

    # -- prediction --------------------------------------------------------------------------
    def _loglik(self, summary: pd.DataFrame, T: np.ndarray) -> np.ndarray:
        """The library's BG/NBD or Pareto/NBD log-likelihood of (recency, frequency) given T."""
        if self._logp is None:
            import pymc as pm
            import pytensor
            import pytensor.tensor as pt

            with _quiet():
                from pymc_marketing.clv.distributions import BetaGeoNBD, ParetoNBD
            obs, span = pt.dmatrix("obs"), pt.dvector("T")
            theta = self._state["transaction"]
            with _quiet():
                if self.params.model == "bgnbd":
                    dist = BetaGeoNBD.dist(a=theta["a"], b=theta["b"], r=theta["r"],
                                           alpha=theta["alpha"], T=span)
                else:
                    dist = ParetoNBD.dist(r=theta["r"], alpha=theta["alpha"], s=theta["s"],
                                          beta=theta["beta"], T=span)
                self._logp = pytensor.function([obs, span], pm.logp(dist, obs))
        values = summary[["recency", "frequency"]].to_numpy(dtype=np.float64)
        with _quiet():
            return np.asarray(self._logp(values, np.asarray(T, dtype=np.float64)))

    def _p_no_purchase(self, summary: pd.DataFrame, t: float) -> np.ndarray:
        """P(no purchase in (T, T + t] | history), for either model, as a likelihood ratio:
        seeing no purchase in (T, T + t] is seeing the same (frequency, recency) over the longer
        window T + t, so P = L(x, t_x, T + t) / L(x, t_x, T) with the library's own likelihood.

        Not `BetaGeoModel.expected_probability_no_purchase`: in pymc-marketing 0.18.2 that formula
        keeps the repeat-buyer dropout term for frequency 0 as well (P(alive) is 1 there), which
        is off by up to 0.1 on CDNOW's one-time buyers. For frequency > 0 the two agree, and for
        Pareto/NBD this matches `expected_purchase_probability(n_purchases=0)` (tests check both).
        """
        T = summary["T"].to_numpy(dtype=np.float64)
        log_ratio = self._loglik(summary, T + t) - self._loglik(summary, T)
        return np.exp(np.minimum(log_ratio, 0.0))

    def btyd_inputs(self, features: pd.DataFrame) -> pd.DataFrame:
        """Per user (row order kept): P(alive) now, expected purchases over the horizon and the
        Gamma-Gamma expected spend per purchase (population mean spend without repeat purchases)."""
        self._fitted()
        summary = rfm_summary(features, self.params.time_unit_days)
        ids = summary["customer_id"].to_numpy()
        if len(summary) == 0:
            return pd.DataFrame({c: np.zeros(0) for c in INPUT_COLUMNS})
        t = self.horizon_days / self.params.time_unit_days
        with _quiet():
            expected = _point(self._transaction.expected_purchases(summary, future_t=t), ids)
            if self.params.model == "bgnbd":
                alive = _point(self._transaction.expected_probability_alive(summary), ids)
            else:
                alive = _point(self._transaction.expected_probability_alive(summary, future_t=0), ids)
            spend = _point(self._spend.expected_customer_spend(summary), ids)
        frame = pd.DataFrame({"btyd_p_alive": alive, "btyd_expected_purchases": expected,
                              "btyd_expected_spend": spend})
        bad = ~np.isfinite(frame.to_numpy()).all(axis=1)
        if bad.any():
            raise UservalueError(
                f"btyd: {int(bad.sum())} of {len(frame)} users got non-finite predictions from the "
                f"fitted {self.params.model} parameters {self._state['transaction']} (BG/NBD needs "
                "a + b > 1 for one-time buyers; try train.btyd.model: pareto_nbd)"
            )
        return frame

    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        inputs = self.btyd_inputs(features)
        summary = rfm_summary(features, self.params.time_unit_days)
        t = self.horizon_days / self.params.time_unit_days
        p_buy = 1.0 - self._p_no_purchase(summary, t) if len(summary) else np.zeros(0)
        value = inputs["btyd_expected_purchases"].to_numpy() * inputs["btyd_expected_spend"].to_numpy()
        return self._frame(features, p_buy, value)

    def predict_outputs(self, features: FeatureArrays) -> tuple[np.ndarray, np.ndarray]:
        """BG/NBD in closed form on the arrays (bgnbd_outputs); Pareto/NBD through predict()."""
        if self.params.model != "bgnbd":
            return super().predict_outputs(features)
        self._fitted()
        returned = (np.asarray(features.aggregates["return_amount_sum"], dtype=np.float64)
                    if "return_amount_sum" in features.aggregates else None)
        rfm = rfm_arrays(features.matrix(RFM_COLUMNS), returned, self.params.time_unit_days)
        p_buy, value = bgnbd_outputs(self._state["transaction"], self._state["spend"], rfm,
                                     self.horizon_days / self.params.time_unit_days)
        return np.clip(p_buy, 0.0, 1.0), np.maximum(value, 0.0)

    # BTYD sees only purchases: no per-behaviour influence or attribution (base returns None).

    # -- persistence -------------------------------------------------------------------------
    def _save_state(self, directory: Path) -> None:
        """The fitted point values as JSON (floats round-trip exactly); loading rebuilds the
        library models around them without refitting and without network."""
        self._fitted()
        (directory / STATE_FILE).write_text(json.dumps({"model": self.params.model, **self._state},
                                                       indent=2))

    def _load_state(self, directory: Path) -> None:
        path = directory / STATE_FILE
        if not path.is_file():
            raise InputError(str(path), "missing", expected="the state written by BtydModel.save")
        raw = json.loads(path.read_text())
        if raw.get("model") != self.params.model:
            raise InputError(str(path), "saved for another BTYD model", expected=self.params.model,
                             found=raw.get("model"))
        self._set_state({"transaction": raw["transaction"], "spend": raw["spend"]})
