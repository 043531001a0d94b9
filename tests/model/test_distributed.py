"""Deep models on several processes (issue 14 §2): torchrun + DistributedDataParallel with gloo on
the CPU, 2 processes, one thread each, on a slice of the real CDNOW features.

Training completes and matches the one-process run with the same seed within a stated tolerance;
an interrupted run resumes from its checkpoint (epochs continue, the weights are those of the
uninterrupted run); a failing worker fails the fit with its error; the train stage runs it and
logs each epoch to MLflow once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import merge
from uservalue.config import TrainParams, parse_params
from uservalue.errors import ConfigError, TransientError
from uservalue.lifecycle.context import StageContext
from uservalue.lifecycle.metrics import normalized_gini
from uservalue.lifecycle.train import train_model
from uservalue.models.base import FitContext
from uservalue.models.deep.checkpoints import CHECKPOINT_FILE
from uservalue.models.deep.data import FeatureDataset, make_loader
from uservalue.models.deep.loop import ShardedBatchSampler, evaluate
from uservalue.models.deep.mlp import MlpModel

TINY = {"hidden": [16], "tower": 16, "embedding_dim": 4, "user_buckets": 64, "batch_size": 256,
        "max_epochs": 4, "patience": 10}
SEED = 3
# One process vs two, same seed: the two runs see the same rows per step but draw different dropout
# masks (one stream per process) and add gradients in another order, so they are not bit-equal.
# Measured on this slice (torch 2.13, CPU): held-out loss 2.1685 vs 2.1733 (0.2% apart), Gini 0.7108 vs
# 0.7109; the bounds below leave room for that.
LOSS_TOLERANCE = 0.02  # relative difference of the held-out ZILN loss
GINI_TOLERANCE = 0.02  # absolute difference of the held-out Gini of expected_value


@pytest.fixture(scope="module", autouse=True)
def _one_thread_per_worker() -> Iterator[None]:
    """Two workers on two cores: one thread each (the workers read OMP_NUM_THREADS)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def small_train(cdnow_features) -> pd.DataFrame:
    return cdnow_features.train.iloc[::10].reset_index(drop=True)


def make(cdnow_features, **overrides) -> MlpModel:
    return MlpModel.from_config({**TINY, **overrides}, cdnow_features.spec, cdnow_features.horizon_days)


def fit(cdnow_features, train: pd.DataFrame, processes: int, checkpoint_dir: Path | None = None,
        log_metrics=None, **overrides) -> tuple[MlpModel, dict]:
    model = make(cdnow_features, **overrides)
    ctx = FitContext(seed=SEED, device="cpu", checkpoint_dir=checkpoint_dir,
                     extra={"nproc_per_node": processes} if processes > 1 else {})
    if log_metrics is not None:
        ctx.log_metrics = log_metrics
    return model, model.fit(train, ctx)


@pytest.fixture(scope="module")
def runs(cdnow_features, small_train) -> dict[int, tuple[MlpModel, dict, list[int]]]:
    """The same fit on 1 and on 2 processes: (model, summary, epochs reported)."""
    out = {}
    for processes in (1, 2):
        steps: list[int] = []
        model, summary = fit(cdnow_features, small_train, processes, log_metrics=lambda m, s, steps=steps: steps.append(s))
        out[processes] = (model, summary, steps)
    return out


def held_out(model: MlpModel, features: pd.DataFrame) -> tuple[float, float]:
    """(mean ZILN loss, Gini of expected_value against the realised value) on the evaluation rows."""
    data = model.tensors(features, labels=True)
    loader = make_loader(FeatureDataset(data), 4096, shuffle=False)
    loss = evaluate(model.network, loader, model.horizon_days, torch.device("cpu"))
    predictions = model.predict(features)
    return loss, normalized_gini(features["value"].to_numpy(), predictions["expected_value"].to_numpy())


def test_sharded_sampler_splits_each_epoch_into_equal_disjoint_shards() -> None:
    n, world = 103, 2
    shards = [ShardedBatchSampler(n, 10, rank=r, world=world, seed=1) for r in range(world)]
    for epoch in (1, 2):
        rows = []
        for sampler in shards:
            sampler.set_epoch(epoch)
            rows.append(torch.cat(list(sampler)))
            assert len(list(sampler)) == len(sampler) == 6
        assert len(rows[0]) == len(rows[1]) == 52  # padded with one repeated row
        together = torch.cat(rows)
        assert set(together.tolist()) == set(range(n)) and len(together) == 104
    lengths = torch.randint(0, 20, (n,))
    bucketed = [ShardedBatchSampler(n, 10, rank=r, world=world, seed=1, lengths=lengths) for r in range(world)]
    for sampler in bucketed:
        sampler.set_epoch(1)
    together = torch.cat([torch.cat(list(s)) for s in bucketed])
    assert set(together.tolist()) == set(range(n)) and len(together) == 104


@pytest.mark.slow  # torchrun: workers start, import torch, rendezvous
def test_two_processes_match_one_within_tolerance(runs, cdnow_features) -> None:
    one, two = runs[1], runs[2]
    assert one[1]["processes"] == 1 and two[1]["processes"] == 2
    assert two[1]["epochs_run"] == one[1]["epochs_run"] == TINY["max_epochs"]
    assert two[2] == [1, 2, 3, 4]  # rank 0 alone reports, each epoch once
    assert two[1]["train_rows"] == one[1]["train_rows"] and two[1]["valid_rows"] == one[1]["valid_rows"]
    # the two processes saw every training row each epoch (the summed rows/s is over all of them)
    loss_1, gini_1 = held_out(one[0], cdnow_features.eval)
    loss_2, gini_2 = held_out(two[0], cdnow_features.eval)
    assert np.isfinite(loss_2) and gini_2 > 0.3  # it learned: CDNOW's Gini is ~0.6
    print(f"held-out loss {loss_1:.5f} vs {loss_2:.5f}, Gini {gini_1:.4f} vs {gini_2:.4f}")
    assert abs(loss_2 - loss_1) <= LOSS_TOLERANCE * abs(loss_1), (loss_1, loss_2)
    assert abs(gini_2 - gini_1) <= GINI_TOLERANCE, (gini_1, gini_2)
    assert two[1]["best_valid_loss"] == pytest.approx(one[1]["best_valid_loss"], rel=LOSS_TOLERANCE)


@pytest.mark.slow  # torchrun: workers start, import torch, rendezvous
def test_interrupted_distributed_run_resumes_from_its_checkpoint(runs, cdnow_features, small_train,
                                                                 tmp_path: Path) -> None:
    def interrupt_after_epoch_2(metrics: dict[str, float], step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cdnow_features, small_train, 2, tmp_path, interrupt_after_epoch_2)
    checkpoint = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["epoch"] == 2 and len(checkpoint["rng_ranks"]) == 2  # each rank's dropout stream

    steps: list[int] = []
    resumed, summary = fit(cdnow_features, small_train, 2, tmp_path, lambda m, s: steps.append(s))
    assert steps == [3, 4]  # the epoch counter continues
    assert summary["resumed_from_epoch"] == 2 and summary["epochs_run"] == 4
    assert not (tmp_path / CHECKPOINT_FILE).exists()
    reference = runs[2][0].network.state_dict()
    for key, value in resumed.network.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow  # torchrun: workers start, import torch, rendezvous
def test_a_failing_worker_fails_the_fit_with_its_error(cdnow_features, small_train, tmp_path: Path) -> None:
    # Rank 0 cannot write its first checkpoint (its folder would be inside a file): it fails after
    # epoch 1, mid-run; rank 1 must not hang, and the error that comes back is rank 0's.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    # An OSError: reported as one process would (TransientError: `uservalue train` exits 75).
    with pytest.raises(TransientError, match=r"rank 0 of 2: (NotADirectoryError|FileExistsError): .*not-a-folder"):
        fit(cdnow_features, small_train.iloc[:600], 2, blocker / "checkpoints")


def test_distributed_param() -> None:
    def train_section(section: dict) -> object:
        return TrainParams.model_validate(section)

    assert train_section({}).nproc_per_node("mlp") == 1
    train = train_section({"sequence": {"distributed": {"nproc_per_node": 2}, "max_epochs": 3}})
    assert train.nproc_per_node("sequence") == 2 and train.model_params("sequence") == {"max_epochs": 3}
    for bad in ({"nproc_per_node": 0}, {"nproc_per_node": "2"}, {"nodes": 2}, 2):
        with pytest.raises(ConfigError, match="train.mlp.distributed"):
            train_section({"mlp": {"distributed": bad}}).nproc_per_node("mlp")
    with pytest.raises(ConfigError, match="only \\['mlp', 'sequence'\\]"):
        train_section({"gbdt": {"distributed": {"nproc_per_node": 2}}}).nproc_per_node("gbdt")


@pytest.mark.slow  # torchrun: workers start, import torch, rendezvous
def test_train_stage_runs_the_sequence_model_on_two_processes(tmp_path: Path, repo_params, cdnow_features,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = StageContext(tmp_path, parse_params(merge(repo_params, {
        "train.models": ["sequence"],
        "train.device": "cpu",
        "train.influence_users": 0,
        "train.sequence": {"d_model": 8, "n_heads": 2, "hidden": [8], "tower": 8, "max_epochs": 2,
                           "max_train_rows": 1500, "distributed": {"nproc_per_node": 2}},
        "tracking.uri": uri,
        "tracking.artifact_location": (tmp_path / "artifacts").as_uri(),
    })))
    result = train_model(ctx, "sequence", cdnow_features.directory, tmp_path / "models" / "sequence")
    assert result.summary["processes"] == 2 and result.summary["epochs_run"] == 2
    assert (tmp_path / "models" / "sequence" / "model").is_dir()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(result.run_id, "valid_loss")] == [1, 2]
    run = client.get_run(result.run_id)
    assert run.data.params["train.sequence.distributed.nproc_per_node"] == "2"
    assert run.data.metrics["fit_processes"] == 2
