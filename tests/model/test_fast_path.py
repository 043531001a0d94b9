"""The service's fast model path (ValueModel.predict_arrays on the online engine's arrays) gives the
numbers of the batch path (predict_with_influence on the feature DataFrame), for every model of the
catalog: no per-call DataFrame, one tensor conversion and one forward pass change no number."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from uservalue.config import MODEL_NAMES
from uservalue.features.online import FeatureArrays, event_columns, online_arrays
from uservalue.models.base import FitContext
from uservalue.models.catalog import create_model
from uservalue.models.deep.data import as_batch, batch_arrays, build_tensors
from uservalue.serving.scorer import score_features

# Small settings so that each model trains in seconds (as tests/model/test_models.py).
QUICK = {
    "historical": {},
    "btyd": {},
    "gbdt": {"max_rounds": 60, "early_stopping_rounds": 10},
    "linear": {},
    "mlp": {"max_epochs": 1, "user_buckets": 1024},
    "sequence": {"max_epochs": 1, "d_model": 16, "tower": 16, "hidden": [16]},
    "gnn": {"max_epochs": 1, "embedding_dim": 16, "neighbors": 8, "tower": 16, "hidden": [16]},
    "ensemble": {"members": {"btyd": {}, "gbdt": {"max_rounds": 60, "early_stopping_rounds": 10},
                             "sequence": {"max_epochs": 1, "d_model": 16, "tower": 16, "hidden": [16]}}},
}
COLUMNS = ["p_buy", "expected_value"]


def test_every_catalog_model_is_covered() -> None:
    assert set(QUICK) == set(MODEL_NAMES)


@pytest.fixture(scope="module")
def fitted_models(synthetic_features, tmp_path_factory):
    """name -> the model fitted once on the synthetic features (shared by every test of this module)."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            fitted = create_model(name, QUICK[name], synthetic_features.spec, synthetic_features.horizon_days)
            fitted.fit(synthetic_features.train,
                       FitContext(seed=0, device="cpu", checkpoint_dir=tmp_path_factory.mktemp(name) / "ckpt"))
            cache[name] = fitted
        return cache[name]

    return get


@pytest.fixture(params=MODEL_NAMES)
def model(request, fitted_models):
    return fitted_models(request.param)


@pytest.fixture(scope="module")
def eval_arrays(synthetic_features, small_synthetic) -> FeatureArrays:
    """The online engine's rows of 300 users at the evaluation cutoff (every behaviour occurs)."""
    events = event_columns(pq.read_table(small_synthetic[0]))
    cutoff = dt.datetime.fromisoformat(synthetic_features.meta["splits"]["eval"][0]["cutoff"])
    users = synthetic_features.eval["user_id"].iloc[::7].head(300).to_numpy()
    return online_arrays(events.take(np.isin(events.user_id, users)), cutoff, synthetic_features.spec)


def _assert_same(fast, batch: pd.DataFrame, behaviors: tuple[str, ...]) -> None:
    np.testing.assert_allclose(fast.p_buy, batch["p_buy"].to_numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fast.expected_value, batch["expected_value"].to_numpy(), rtol=1e-6, atol=1e-9)
    influence = batch[[f"influence_{b}" for b in behaviors]].to_numpy()
    np.testing.assert_allclose(fast.influence, influence, rtol=1e-6, atol=1e-9)


def test_fast_path_equals_batch_scoring(model, eval_arrays) -> None:
    batch = score_features(model, eval_arrays.to_pandas())  # what `uservalue score` and the monitor run
    fast = model.predict_arrays(eval_arrays)
    # The numbers of predict() on the DataFrame (the influence reads the model through predict_outputs).
    predicted = model.predict(eval_arrays.to_pandas())
    np.testing.assert_allclose(fast.p_buy, predicted["p_buy"].to_numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fast.expected_value, predicted["expected_value"].to_numpy(), rtol=1e-6, atol=1e-9)
    assert len(fast) == len(eval_arrays) and fast.influence.shape == (len(eval_arrays), len(model.spec.behaviors))
    _assert_same(fast, batch, model.spec.behaviors)
    shares = fast.influence.sum(axis=1)
    assert np.allclose(shares[shares > 0], 1.0)


def test_fast_path_one_user_at_a_time_equals_the_batch(model, eval_arrays) -> None:
    """The service scores a request's few users together: any subset gives each user the same numbers."""
    batch = score_features(model, eval_arrays.to_pandas())
    for row in (0, 1, 57, len(eval_arrays) - 1):
        _assert_same(model.predict_arrays(eval_arrays.take(np.array([row]))), batch.iloc[[row]], model.spec.behaviors)
    rows = np.array([5, 3, 200])
    _assert_same(model.predict_arrays(eval_arrays.take(rows)), batch.iloc[rows], model.spec.behaviors)


@pytest.mark.parametrize("name", ["mlp", "sequence", "gnn"])  # the deep models: they chunk their forward passes
def test_deep_fast_path_in_chunks(name, fitted_models, eval_arrays) -> None:
    """More rows than one stacked forward pass holds are scored chunk by chunk, with the same numbers."""
    model = fitted_models(name)
    whole = model.predict_arrays(eval_arrays)
    saved = model.params
    model.params = saved.model_copy(update={"predict_batch_size": 37})
    try:
        chunked = model.predict_arrays(eval_arrays)
    finally:
        model.params = saved
    for name in ("p_buy", "expected_value", "influence"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["mlp", "sequence"])
def test_deep_models_serve_a_torchscript_trace_traced_on_one_row(name, fitted_models, eval_arrays) -> None:
    """The MLP's and the sequence model's fast path runs the network traced by TorchScript (checked bit
    for bit against eager on the first batch and on a wider one); a trace taken on one row scores any
    number of rows, of any lengths, with the batch's numbers. The graph model runs eager."""
    model = fitted_models(name)
    assert model.traced_inference and not fitted_models("gnn").traced_inference
    model._traced = None  # trace again, on a single row this time
    model.predict_arrays(eval_arrays.take(np.array([3])))
    assert model.serving_is_traced
    _assert_same(model.predict_arrays(eval_arrays), score_features(model, eval_arrays.to_pandas()), model.spec.behaviors)


def test_batch_arrays_equal_the_tensors_of_the_dataframe(synthetic_features, eval_arrays) -> None:
    """batch_arrays (the deep models' predict_outputs input) and build_tensors (their training and
    predict() input) give the same model input."""
    spec = synthetic_features.spec
    columns = spec.aggregate_columns()
    arrays = batch_arrays(eval_arrays, columns, spec.sequence_length, user_buckets=64)
    tensors = build_tensors(eval_arrays.to_pandas(), columns, spec.sequence_length,
                            synthetic_features.horizon_days, user_buckets=64, labels=False)
    reference = tensors.batch(torch.arange(len(tensors)))
    for name, value in as_batch(arrays, torch.device("cpu")).items():
        assert torch.equal(value, reference[name]), name
