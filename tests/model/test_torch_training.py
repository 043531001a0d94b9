"""The deep models' shared machinery: feature tensors, and the training loop's checkpoint/resume,
early stopping, seeding and metrics (on a slice of the real CDNOW features)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from uservalue.errors import ConfigError
from uservalue.models.base import FitContext, validation_mask
from uservalue.models.deep.mlp import MlpModel
from uservalue.models.deep.checkpoints import CHECKPOINT_FILE
from uservalue.models.deep.data import (
    AggregateStats,
    BatchSampler,
    FeatureDataset,
    hash_buckets,
    make_loader,
    padded,
    transform_numpy,
)
from uservalue.models.deep.layers import AggregateNorm, rows_per_id
from uservalue.models.deep.loop import evaluate
from uservalue.models.deep.occlusion import drop_tokens
from uservalue.models.deep.runtime import resolve_device

TINY = {"hidden": [16], "tower": 16, "embedding_dim": 4, "user_buckets": 64, "batch_size": 256,
        "max_epochs": 4, "patience": 10}
METRICS = {"train_loss", "valid_loss", "epoch_seconds", "samples_per_second"}


@pytest.fixture(scope="module")
def small_train(cdnow_features) -> pd.DataFrame:
    return cdnow_features.train.iloc[::10].reset_index(drop=True)


def make(cdnow_features, **overrides) -> MlpModel:
    return MlpModel.from_config({**TINY, **overrides}, cdnow_features.spec, cdnow_features.horizon_days)


def weights(model: MlpModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.network.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


# -- tensors ---------------------------------------------------------------------------------
def test_padded_keeps_the_last_events_left_aligned() -> None:
    series = pd.Series([np.array([1, 2, 3]), np.array([], dtype=np.int64), None, np.arange(10)], name="x")
    out, lengths = padded(series, 4, np.int32)
    np.testing.assert_array_equal(out, [[1, 2, 3, 0], [0, 0, 0, 0], [0, 0, 0, 0], [6, 7, 8, 9]])
    np.testing.assert_array_equal(lengths, [3, 0, 0, 4])
    arrow = pd.Series(pd.arrays.ArrowExtensionArray(pa.array(series.tolist(), pa.list_(pa.int64()))), name="x")
    out_arrow, _ = padded(arrow, 4, np.int32)
    np.testing.assert_array_equal(out_arrow, out)


def test_feature_tensors_from_cdnow(cdnow_features) -> None:
    model = make(cdnow_features)
    train = cdnow_features.train
    data = model.tensors(train, labels=True)
    L = cdnow_features.spec.sequence_length
    assert data.agg.shape == (len(train), len(model.feature_columns))
    assert data.behavior.shape == (len(train), L) and data.continuous.shape == (len(train), L, 3)
    position = torch.arange(L)[None, :]
    assert bool((data.behavior[position < data.lengths[:, None]] > 0).all())
    assert bool((data.behavior[position >= data.lengths[:, None]] == 0).all())
    assert int(data.behavior.max()) <= len(cdnow_features.spec.behaviors)
    expected = np.log(train["label_days"].to_numpy() / cdnow_features.horizon_days)
    np.testing.assert_allclose(data.log_exposure.numpy(), expected, rtol=1e-6)
    np.testing.assert_array_equal(data.bought.numpy() > 0, train["bought"].to_numpy())
    # The newest event of each row is the last list element.
    last = np.array([s[-1] for s in train["seq_log_age_days"].head(50)], dtype=np.float32)
    got = data.continuous[torch.arange(50), data.lengths[:50] - 1, 0].numpy()
    np.testing.assert_array_equal(got, last)
    scoring = model.tensors(cdnow_features.eval, labels=False)
    assert float(scoring.log_exposure.abs().max()) == 0.0


def test_aggregate_norm_is_the_fitted_numpy_transform(cdnow_features) -> None:
    model = make(cdnow_features)
    raw = model.tensors(cdnow_features.train, labels=True).agg.numpy().astype(np.float64)
    stats = AggregateStats.fit(raw, model.feature_columns)
    assert stats.log1p.all()  # every CDNOW aggregate is non-negative
    expected = (transform_numpy(raw, stats.log1p) - stats.mean) / stats.std
    got = AggregateNorm(stats)(torch.from_numpy(raw).float()).numpy()
    np.testing.assert_allclose(got, np.clip(expected, -10, 10), atol=2e-5)
    np.testing.assert_allclose(expected.mean(axis=0), 0, atol=1e-6)


def test_drop_tokens_repacks_the_kept_events() -> None:
    batch = {
        "behavior": torch.tensor([[1, 3, 1, 2], [3, 3, 0, 0]]),
        "category": torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0]], dtype=torch.int32),
        "item": torch.tensor([[9, 8, 7, 6], [4, 5, 0, 0]], dtype=torch.int32),
        "continuous": torch.arange(24, dtype=torch.float32).reshape(2, 4, 3),
        "lengths": torch.tensor([4, 2]),
    }
    out = drop_tokens(batch, batch["behavior"] != 3)
    assert out["lengths"].tolist() == [3, 0]
    assert out["behavior"].tolist() == [[1, 1, 2, 0], [0, 0, 0, 0]]
    assert out["category"].tolist() == [[5, 7, 8, 0], [0, 0, 0, 0]]
    assert torch.equal(out["continuous"][0, 1], batch["continuous"][0, 2])


def test_rows_per_id_and_hash_buckets() -> None:
    ids = torch.tensor([[3, 3, 1, 0], [3, 2, 0, 0], [5, 5, 5, 5]], dtype=torch.int32)
    counts = rows_per_id(ids, torch.tensor([3, 2, 2]), 5)
    assert counts.tolist() == [0, 1, 1, 2, 0, 1]
    users = pd.Series(["a", "b", "c", "a"])
    buckets = hash_buckets(users, 7)
    assert buckets[0] == buckets[3] and ((buckets >= 0) & (buckets < 7)).all()
    np.testing.assert_array_equal(buckets, hash_buckets(users, 7))


def test_batch_sampler_is_a_seeded_permutation_with_length_buckets() -> None:
    lengths = torch.from_numpy(np.random.default_rng(0).geometric(0.3, 5000)).clamp(max=50)

    def epoch(e: int, bucket: bool, seed: int = 1) -> list[torch.Tensor]:
        sampler = BatchSampler(5000, 64, shuffle=True, seed=seed, lengths=lengths if bucket else None)
        sampler.set_epoch(e)
        return list(sampler)

    for bucket in (False, True):
        batches = epoch(3, bucket)
        assert len(batches) == len(BatchSampler(5000, 64, shuffle=True)) == 79
        assert sorted(torch.cat(batches).tolist()) == list(range(5000))
        assert all(torch.equal(a, b) for a, b in zip(batches, epoch(3, bucket), strict=True))
        assert not torch.equal(torch.cat(batches), torch.cat(epoch(4, bucket)))
        assert not torch.equal(torch.cat(batches), torch.cat(epoch(3, bucket, seed=2)))
    width = {bucket: np.mean([int(lengths[b].max()) for b in epoch(0, bucket)]) for bucket in (False, True)}
    assert width[True] < 0.5 * width[False]


def test_resolve_device() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


# -- the loop --------------------------------------------------------------------------------
def test_interrupted_run_resumes_to_the_same_weights(cdnow_features, small_train, tmp_path: Path) -> None:
    reference = make(cdnow_features)
    reference.fit(small_train, FitContext(seed=3, device="cpu", checkpoint_dir=tmp_path / "reference"))
    assert not (tmp_path / "reference" / CHECKPOINT_FILE).exists()

    def interrupt_after_epoch_2(metrics: dict[str, float], step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    checkpoints = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        make(cdnow_features).fit(small_train, FitContext(seed=3, device="cpu", checkpoint_dir=checkpoints,
                                                         log_metrics=interrupt_after_epoch_2))
    assert (checkpoints / CHECKPOINT_FILE).is_file()

    steps: list[int] = []
    resumed = make(cdnow_features)
    summary = resumed.fit(small_train, FitContext(seed=3, device="cpu", checkpoint_dir=checkpoints,
                                                  log_metrics=lambda m, s: steps.append(s)))
    assert steps == [3, 4]
    assert summary["resumed_from_epoch"] == 2 and summary["epochs_run"] == 4
    assert not (checkpoints / CHECKPOINT_FILE).exists()
    assert_same_weights(weights(resumed), weights(reference))
    pd.testing.assert_frame_equal(resumed.predict(cdnow_features.eval.head(500)),
                                  reference.predict(cdnow_features.eval.head(500)))


def test_checkpoint_of_other_params_is_not_resumed(cdnow_features, small_train, tmp_path: Path) -> None:
    def interrupt(metrics: dict[str, float], step: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make(cdnow_features, lr=0.01).fit(small_train, FitContext(seed=3, device="cpu", checkpoint_dir=tmp_path,
                                                                  log_metrics=interrupt))
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    steps: list[int] = []
    model = make(cdnow_features, max_epochs=2)
    summary = model.fit(small_train, FitContext(seed=3, device="cpu", checkpoint_dir=tmp_path,
                                                log_metrics=lambda m, s: steps.append(s)))
    assert steps == [1, 2] and summary["resumed_from_epoch"] == 0
    fresh = make(cdnow_features, max_epochs=2)
    fresh.fit(small_train, FitContext(seed=3, device="cpu"))
    assert_same_weights(weights(model), weights(fresh))

    # A torn file is not resumed either.
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    summary = make(cdnow_features, max_epochs=1).fit(small_train, FitContext(seed=3, checkpoint_dir=tmp_path))
    assert summary["resumed_from_epoch"] == 0


def test_early_stopping_restores_the_best_epoch(cdnow_features, small_train) -> None:
    logged: list[tuple[int, dict[str, float]]] = []
    model = make(cdnow_features, lr=0.02, patience=1, max_epochs=40, user_buckets=4096, hidden=[128, 128])
    ctx = FitContext(seed=0, device="cpu", log_metrics=lambda m, s: logged.append((s, m)))
    summary = model.fit(small_train, ctx)
    assert summary["epochs_run"] < 40
    assert summary["best_epoch"] == summary["epochs_run"] - 1
    assert [s for s, _ in logged] == list(range(1, summary["epochs_run"] + 1))
    assert all(set(m) == METRICS and all(math.isfinite(v) for v in m.values()) for _, m in logged)
    assert summary["best_valid_loss"] == pytest.approx(min(m["valid_loss"] for _, m in logged))
    assert summary["device"] == "cpu" and summary["total_seconds"] > 0

    valid = validation_mask(small_train["user_id"], ctx.valid_fraction, ctx.seed)
    data = model.tensors(small_train, labels=True)
    loader = make_loader(FeatureDataset(data, np.flatnonzero(valid)), 8192, shuffle=False)
    again = evaluate(model.network, loader, cdnow_features.horizon_days, torch.device("cpu"))
    assert again == pytest.approx(summary["best_valid_loss"], rel=1e-6)


def test_seed_decides_the_result(cdnow_features, small_train) -> None:
    runs = []
    for seed in (5, 5, 6):
        model = make(cdnow_features, max_epochs=1)
        model.fit(small_train, FitContext(seed=seed, device="cpu"))
        runs.append(model.predict(cdnow_features.eval.head(300))["expected_value"].to_numpy())
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
