"""The one training loop of the deep models, and their shared ValueModel plumbing.

`train_network` fits any network whose forward(batch) returns ZILN outputs [B, 3] and that has a
`head` (uservalue.models.deep.ziln.ZilnHead):

- device: CUDA when available, else CPU; FitContext.device forces "cpu" or "cuda". bf16 autocast
  on CUDA only (the loss is always computed in float32); pinned-memory DataLoader on CUDA.
- reproducibility: torch/numpy/random seeded from FitContext.seed; deterministic algorithms on
  CPU; the batch order of epoch e depends only on (seed, e).
- early stopping on a user-level validation split (base.validation_mask) with `patience`; the
  best weights are restored at the end.
- checkpoints: after every epoch `<checkpoint_dir>/checkpoint.pt` holds model, optimizer, epoch,
  best weights and loss, patience counter, RNG states and a fingerprint of params + data; a run
  that finds a checkpoint with its fingerprint resumes after its epoch (and ends with the same
  weights as an uninterrupted run), one with another fingerprint is discarded. The checkpoint is
  removed when the fit completes.
- metrics per epoch through FitContext.log_metrics: train_loss, valid_loss, epoch_seconds,
  samples_per_second.

`TorchValueModel` is the ValueModel both deep models derive from: fit (tensors, statistics,
network, training, behaviour influence), batched prediction without autograd, save/load, and the
behaviour attribution described in uservalue.models.deep.sequence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import nn

from uservalue.errors import ConfigError
from uservalue.features.sql import FeatureSpec
from uservalue.models.deep import ziln
from uservalue.models.base import (
    FitContext,
    ModelParams,
    ValueModel,
    behavior_of_column,
    exposure_days,
    validation_mask,
)
from uservalue.models.deep.data import (
    AggregateStats,
    FeatureDataset,
    FeatureTensors,
    HashedEmbedding,
    TokenStats,
    build_tensors,
    drop_tokens,
    make_loader,
    rows_per_id,
    to_device,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "weights.pt"
INFLUENCE_FILE = "influence.json"
MIN_RELATIVE_IMPROVEMENT = 1e-4


class TorchParams(ModelParams):
    """What every deep model's training needs (each model sets its own defaults)."""

    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    batch_size: int = Field(512, ge=1)
    max_epochs: int = Field(20, ge=1)
    patience: int = Field(3, ge=1, description="epochs without a better validation loss before stopping")
    grad_clip: float = Field(5.0, gt=0)
    predict_batch_size: int = Field(8192, ge=1)
    influence_rows: int = Field(4096, ge=0, description="rows the global behaviour influence is computed on")
    min_id_rows: int = Field(20, ge=1, description="category/item ids held by fewer training rows are unknown (0)")
    bucket_by_length: bool = Field(
        False, description="training batches of similar sequence length: faster on skewed lengths, "
                           "but the batches are no longer i.i.d. (noisier calibration)")


# --------------------------------------------------------------------------------------------
# device, seeds, determinism
# --------------------------------------------------------------------------------------------
def resolve_device(requested: str = "auto") -> torch.device:
    requested = (requested or "auto").lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{requested}' requested but CUDA is not available (use auto or cpu)")
        return torch.device(requested)
    raise ConfigError(f"device must be auto, cpu or cuda, got '{requested}'")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def deterministic(enabled: bool) -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(data: FeatureTensors, valid: np.ndarray) -> dict[str, Any]:
    return {
        "rows": len(data),
        "agg_shape": list(data.agg.shape),
        "sequence_shape": list(data.behavior.shape),
        "valid_rows": int(valid.sum()),
        "bought": float(data.bought.double().sum()),
        "value": round(float(data.value.double().sum()), 3),
    }


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, expected: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a torn or foreign file is not resumable
        log.warning("ignoring unreadable checkpoint %s: %s", path, error)
        path.unlink(missing_ok=True)
        return None
    if state.get("fingerprint") != expected:
        log.warning("ignoring checkpoint %s: it belongs to other params or data", path)
        path.unlink(missing_ok=True)
        return None
    return state


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------
def batch_loss(net: nn.Module, batch: dict[str, torch.Tensor], horizon_days: float, device: torch.device) -> torch.Tensor:
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = net(batch)
    return ziln.ziln_nll(
        out.float(), net.head.beta, bought=batch["bought"], value=batch["value"],
        log_exposure=batch["log_exposure"], horizon_days=horizon_days,
    )


def evaluate(net: nn.Module, loader: Any, horizon_days: float, device: torch.device) -> float:
    net.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in loader:
            batch = to_device(batch, device)
            loss = batch_loss(net, batch, horizon_days, device)
            total += float(loss.double().sum())
            count += int(loss.numel())
    return total / max(count, 1)


def train_network(
    net: nn.Module,
    data: FeatureTensors,
    valid: np.ndarray,
    *,
    params: TorchParams,
    ctx: FitContext,
    horizon_days: float,
    device: torch.device,
    run_fingerprint: str,
) -> dict[str, Any]:
    """Fit `net` in place (best weights restored) and return the fit summary."""
    started = time.perf_counter()
    cuda = device.type == "cuda"
    train_rows = np.flatnonzero(~valid)
    valid_rows = np.flatnonzero(valid)
    if train_rows.size == 0:
        raise ConfigError("no training rows left after the validation split (lower valid_fraction)")
    train_loader = make_loader(FeatureDataset(data, train_rows), params.batch_size, shuffle=True,
                               seed=ctx.seed, pin_memory=cuda, bucket=params.bucket_by_length)
    # Validation in order of sequence length: narrow batches for short histories, same loss.
    valid_sorted = valid_rows[np.argsort(data.lengths.numpy()[valid_rows], kind="stable")]
    valid_loader = (make_loader(FeatureDataset(data, valid_sorted), params.predict_batch_size, shuffle=False,
                                pin_memory=cuda) if valid_rows.size else None)
    net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=params.lr, weight_decay=params.weight_decay)

    checkpoint_path = Path(ctx.checkpoint_dir) / CHECKPOINT_FILE if ctx.checkpoint_dir else None
    start_epoch, best_loss, best_epoch, bad_epochs, done = 0, math.inf, 0, 0, False
    best_state = _cpu_state(net)
    history: list[dict[str, float]] = []
    resumed_from = 0
    if checkpoint_path is not None:
        state = _load_checkpoint(checkpoint_path, run_fingerprint)
        if state is not None:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, best_loss, best_epoch = state["epoch"], state["best_loss"], state["best_epoch"]
            bad_epochs, done, best_state = state["bad_epochs"], state["done"], state["best_state"]
            history = list(state.get("history", []))
            _set_rng_state(state["rng"])
            resumed_from = start_epoch
            log.info("resuming from %s after epoch %d", checkpoint_path, start_epoch)

    epoch = start_epoch
    with deterministic(not cuda):
        while not done and epoch < params.max_epochs:
            epoch += 1
            epoch_start = time.perf_counter()
            train_loader.sampler.set_epoch(epoch)
            net.train()
            total = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no sync per step
            count = 0
            for batch in train_loader:
                batch = to_device(batch, device)
                loss = batch_loss(net, batch, horizon_days, device).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), params.grad_clip)
                optimizer.step()
                n = int(batch["bought"].shape[0])
                total += loss.detach().double() * n
                count += n
            train_loss = float(total) / max(count, 1)
            train_seconds = time.perf_counter() - epoch_start
            valid_loss = evaluate(net, valid_loader, horizon_days, device) if valid_loader else train_loss
            monitored = valid_loss if math.isfinite(valid_loss) else math.inf
            if monitored < best_loss - MIN_RELATIVE_IMPROVEMENT * abs(best_loss if math.isfinite(best_loss) else 0):
                best_loss, best_epoch, bad_epochs = monitored, epoch, 0
                best_state = _cpu_state(net)
            else:
                bad_epochs += 1
            done = bad_epochs >= params.patience or epoch >= params.max_epochs
            metrics = {
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "epoch_seconds": time.perf_counter() - epoch_start,
                "samples_per_second": count / max(train_seconds, 1e-9),
            }
            history.append({"epoch": epoch, **metrics})
            log.info("epoch %d: train %.5f valid %.5f (%.1f s, %.0f rows/s)", epoch, train_loss, valid_loss,
                     metrics["epoch_seconds"], metrics["samples_per_second"])
            if checkpoint_path is not None:
                _save_checkpoint(checkpoint_path, {
                    "fingerprint": run_fingerprint, "epoch": epoch, "model": _cpu_state(net),
                    "optimizer": optimizer.state_dict(), "best_state": best_state, "best_loss": best_loss,
                    "best_epoch": best_epoch, "bad_epochs": bad_epochs, "done": done, "history": history,
                    "rng": _rng_state(),
                })
            ctx.log_metrics(metrics, epoch)

    net.load_state_dict(best_state)
    net.eval()
    if checkpoint_path is not None:
        checkpoint_path.unlink(missing_ok=True)
    return {
        "best_epoch": best_epoch,
        "best_valid_loss": best_loss,
        "epochs_run": epoch,
        "resumed_from_epoch": resumed_from,
        "device": device.type,
        "train_rows": int(train_rows.size),
        "valid_rows": int(valid_rows.size),
        "total_seconds": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------
# the shared ValueModel
# --------------------------------------------------------------------------------------------
class TorchValueModel(ValueModel):
    """fit / predict / save / load / influence / attribute for a network built by the subclass."""

    Params = TorchParams

    def __init__(self, params: ModelParams, spec: FeatureSpec, horizon_days: int) -> None:
        super().__init__(params, spec, horizon_days)
        self.network: nn.Module | None = None
        self.device = torch.device("cpu")
        self._influence: dict[str, float] | None = None
        self.fit_summary: dict[str, Any] = {}

    # -- what a subclass provides ---------------------------------------------------------------
    @abstractmethod
    def build_network(self, agg_stats: AggregateStats, token_stats: TokenStats,
                      bias: tuple[float, ...]) -> nn.Module:
        """A fresh network (its forward(batch) returns ZILN outputs [B, 3]; it has `.head`)."""

    @property
    def user_buckets(self) -> int:
        return 1

    # -- data -----------------------------------------------------------------------------------
    def tensors(self, frame: pd.DataFrame, *, labels: bool) -> FeatureTensors:
        return build_tensors(frame, self.feature_columns, self.spec.sequence_length, self.horizon_days,
                             user_buckets=self.user_buckets, labels=labels)

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, train: pd.DataFrame, ctx: FitContext) -> dict[str, Any]:
        params: TorchParams = self.params  # type: ignore[assignment]
        device = resolve_device(ctx.device)
        data = self.tensors(train, labels=True)
        agg_stats = AggregateStats.fit(data.agg.numpy().astype(np.float64), self.feature_columns)
        token_stats = TokenStats.fit(data.continuous.numpy(), data.lengths.numpy())
        bias = ziln.initial_bias(data.bought.numpy(), data.value.numpy(), exposure_days(train, self.horizon_days),
                                 self.horizon_days)
        valid = validation_mask(train["user_id"], ctx.valid_fraction, ctx.seed)
        seed_everything(ctx.seed)
        net = self.build_network(agg_stats, token_stats, bias)
        for name, buckets in (("category", self.spec.category_buckets), ("item", self.spec.item_buckets)):
            table = getattr(net, name, None)
            if isinstance(table, HashedEmbedding):
                table.set_vocabulary(rows_per_id(getattr(data, name), data.lengths, buckets), params.min_id_rows)
        run_fingerprint = fingerprint({
            "model": self.name, "params": params.model_dump(mode="json"), "spec": self.spec.__dict__,
            "horizon_days": self.horizon_days, "seed": ctx.seed, "valid_fraction": ctx.valid_fraction,
            "data": data_fingerprint(data, valid),
        })
        summary = train_network(net, data, valid, params=params, ctx=ctx, horizon_days=self.horizon_days,
                                device=device, run_fingerprint=run_fingerprint)
        self.network, self.device = net, device
        rows = np.flatnonzero(valid) if valid.any() else np.arange(len(data))
        if params.influence_rows > 0:
            if rows.size > params.influence_rows:
                rows = np.sort(np.random.default_rng(ctx.seed).choice(rows, params.influence_rows, replace=False))
            influence_start = time.perf_counter()
            self._influence = self._global_influence(data, rows)
            summary["influence_seconds"] = time.perf_counter() - influence_start
        self.fit_summary = summary
        return summary

    # -- predict --------------------------------------------------------------------------------
    def _outputs(self, data: FeatureTensors, fn: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """fn(batch) for every batch of `data`, in order, without autograd: (row index, result)."""
        if self.network is None:
            raise RuntimeError(f"{self.name} model is not fitted")
        params: TorchParams = self.params  # type: ignore[assignment]
        self.network.eval()
        # Rows in order of sequence length, so each batch is only as wide as its longest history.
        order = torch.argsort(data.lengths, stable=True)
        loader = make_loader(FeatureDataset(data, order), params.predict_batch_size, shuffle=False,
                             pin_memory=self.device.type == "cuda")
        results = []
        start = 0
        with torch.inference_mode():
            for batch in loader:
                n = int(batch["lengths"].shape[0])
                results.append((order[start:start + n], fn(to_device(batch, self.device)).cpu()))
                start += n
        return results

    def _raw(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Scoring runs in float32 on every device (bf16 is for training only), so a model gives the
        # same predictions on CUDA and, after loading, on CPU up to float rounding.
        return self.network(batch).float()  # type: ignore[misc]

    def predict(self, features: pd.DataFrame) -> pd.DataFrame:
        data = self.tensors(features, labels=False)
        p_buy = np.empty(len(data))
        value = np.empty(len(data))
        for index, out in self._outputs(data, self._raw):
            p, ev = ziln.predict(out, self.horizon_days)
            p_buy[index.numpy()] = p.double().cpu().numpy()
            value[index.numpy()] = ev.double().cpu().numpy()
        return self._frame(features, p_buy, value)

    def predict_with_influence(self, features: pd.DataFrame) -> pd.DataFrame:
        # One tensor conversion and one forward pass of the full input serve both the prediction
        # and the occlusion baseline (the service pays both on every request).
        data = self.tensors(features, labels=False)
        raw = np.empty((len(data), 3))
        phi, counts = self._occlusion(data, outputs=raw)
        # float32 outputs (exact through the float64 buffer): the same numbers as predict().
        p_buy, value = ziln.predict(torch.from_numpy(raw.astype(np.float32)), self.horizon_days)
        predictions = self._frame(features, p_buy.double().numpy(), value.double().numpy())
        shares = self._shares(phi, counts)
        for i, behavior in enumerate(self.spec.behaviors):
            predictions[f"influence_{behavior}"] = shares[:, i]
        return predictions

    # -- behaviour attribution ------------------------------------------------------------------
    def _players(self, data: FeatureTensors) -> list[int]:
        """Behaviours (index into spec.behaviors) that occur anywhere in `data`."""
        columns = self.feature_columns
        players = []
        for i, b in enumerate(self.spec.behaviors):
            in_tokens = bool((data.behavior == i + 1).any())
            count_col = f"{b}_count"
            in_counts = count_col in columns and bool((data.agg[:, columns.index(count_col)] > 0).any())
            if in_tokens or in_counts:
                players.append(i)
        return players

    def _removal_plan(self) -> dict[int, list[tuple[int, str]]]:
        """Per behaviour: (aggregate column index, how to blank it) for the columns it owns."""
        columns = self.feature_columns
        plan: dict[int, list[tuple[int, str]]] = {}
        for i, b in enumerate(self.spec.behaviors):
            edits = []
            for j, column in enumerate(columns):
                if behavior_of_column(column, self.spec.behaviors) != b:
                    continue
                if column == f"{b}_recency_days":
                    edits.append((j, "tenure" if "tenure_days" in columns else "keep"))
                else:
                    edits.append((j, "zero"))
            if f"{b}_count" in columns and "n_events" in columns:
                edits.append((columns.index("n_events"), f"minus:{columns.index(f'{b}_count')}"))
            plan[i] = edits
        return plan

    def _without(self, batch: dict[str, torch.Tensor], removed: list[int],
                 plan: dict[int, list[tuple[int, str]]]) -> dict[str, torch.Tensor]:
        """The batch as if the users had no events of the behaviours `removed` (0-based ids)."""
        if not removed:
            return batch
        ids = torch.tensor([i + 1 for i in removed], device=batch["behavior"].device)
        keep = ~torch.isin(batch["behavior"], ids)
        out = drop_tokens(batch, keep)
        agg = batch["agg"].clone()
        columns = self.feature_columns
        tenure = agg[:, columns.index("tenure_days")] if "tenure_days" in columns else None
        for i in removed:
            for j, how in plan[i]:
                if how == "zero":
                    agg[:, j] = 0
                elif how == "tenure" and tenure is not None:
                    agg[:, j] = tenure
                elif how.startswith("minus:"):
                    agg[:, j] = (agg[:, j] - batch["agg"][:, int(how.split(":")[1])]).clamp_min(0)
        out["agg"] = agg
        return out

    def _occlusion(self, data: FeatureTensors, rows: np.ndarray | None = None,
                   outputs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per row and behaviour: f(user) - f(user without any event of that behaviour), where f is
        the predicted log expected value; and each row's event count per behaviour. `outputs`
        ([rows, 3]), when given, receives the network's raw output for the full input."""
        subset = data if rows is None else _take(data, rows)
        players = self._players(subset)
        plan = self._removal_plan()
        n_behaviors = len(self.spec.behaviors)
        delta = np.zeros((len(subset), n_behaviors))

        def effects(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            raw = self._raw(batch)
            full = ziln.log_expected_value(raw, self.horizon_days).double()
            out = torch.zeros((full.shape[0], n_behaviors), dtype=torch.float64, device=full.device)
            for player in players:
                without = ziln.log_expected_value(self._raw(self._without(batch, [player], plan)), self.horizon_days)
                out[:, player] = full - without.double()
            return torch.cat([out, raw.double()], dim=1)

        if players or outputs is not None:
            for index, values in self._outputs(subset, effects):
                values = values.cpu().numpy()
                delta[index.numpy()] = values[:, :n_behaviors]
                if outputs is not None:
                    outputs[index.numpy()] = values[:, n_behaviors:]
        counts = self._event_counts(subset)
        delta[counts == 0] = 0.0  # removing nothing changes nothing
        return delta, counts

    def _event_counts(self, data: FeatureTensors) -> np.ndarray:
        columns = self.feature_columns
        counts = np.zeros((len(data), len(self.spec.behaviors)))
        for i, b in enumerate(self.spec.behaviors):
            if f"{b}_count" in columns:
                counts[:, i] = data.agg[:, columns.index(f"{b}_count")].double().numpy()
            else:
                counts[:, i] = (data.behavior == i + 1).sum(dim=1).double().numpy()
        return np.nan_to_num(counts)

    def _global_influence(self, data: FeatureTensors, rows: np.ndarray) -> dict[str, float]:
        phi, counts = self._occlusion(data, rows)
        events = counts.sum(axis=0)
        per_event = np.where(events > 0, phi.sum(axis=0) / np.maximum(events, 1e-12), 0.0)
        positive = np.clip(per_event, 0, None)
        shares = positive / positive.sum() if positive.sum() > 0 else np.full(len(per_event), 1 / len(per_event))
        self.per_event_effect = dict(zip(self.spec.behaviors, per_event.tolist(), strict=True))
        return dict(zip(self.spec.behaviors, shares.tolist(), strict=True))

    def influence(self) -> dict[str, float] | None:
        return None if self._influence is None else dict(self._influence)

    @staticmethod
    def _shares(phi: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Occlusion effects as per-row shares that sum to 1."""
        magnitude = np.abs(phi)
        total = magnitude.sum(axis=1, keepdims=True)
        # Nothing moves the prediction: share equally among the behaviours the user has.
        has = (counts > 0).astype(np.float64)
        fallback = np.where(has.sum(axis=1, keepdims=True) > 0, has, 1.0)
        fallback = fallback / fallback.sum(axis=1, keepdims=True)
        return np.where(total > 0, magnitude / np.where(total > 0, total, 1.0), fallback)

    def attribute(self, features: pd.DataFrame) -> pd.DataFrame:
        data = self.tensors(features, labels=False)
        frame = pd.DataFrame(self._shares(*self._occlusion(data)), columns=list(self.spec.behaviors))
        frame.insert(0, "user_id", features["user_id"].astype(str).to_numpy())
        return frame

    # -- persistence ----------------------------------------------------------------------------
    def _save_state(self, directory: Path) -> None:
        if self.network is None:
            raise RuntimeError(f"{self.name} model is not fitted")
        net = self.network
        torch.save({
            "state_dict": _cpu_state(net),
            "agg_stats": {"columns": list(net.agg_stats.columns), "log1p": net.agg_stats.log1p.tolist(),
                          "mean": net.agg_stats.mean.tolist(), "std": net.agg_stats.std.tolist()},
            "token_stats": {"mean": net.token_stats.mean.tolist(), "std": net.token_stats.std.tolist()},
            "bias": list(net.initial_bias),
        }, directory / WEIGHTS_FILE)
        (directory / INFLUENCE_FILE).write_text(json.dumps({
            "influence": self._influence,
            "per_event_effect": getattr(self, "per_event_effect", None),
            "fit_summary": {k: v for k, v in self.fit_summary.items()},
        }, indent=2, default=str))

    def _load_state(self, directory: Path) -> None:
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        a = state["agg_stats"]
        agg_stats = AggregateStats(tuple(a["columns"]), np.asarray(a["log1p"], dtype=bool),
                                   np.asarray(a["mean"]), np.asarray(a["std"]))
        t = state["token_stats"]
        token_stats = TokenStats(np.asarray(t["mean"]), np.asarray(t["std"]))
        net = self.build_network(agg_stats, token_stats, tuple(state["bias"]))
        net.load_state_dict(state["state_dict"])
        self.device = resolve_device("auto")
        self.network = net.to(self.device).eval()
        influence_path = directory / INFLUENCE_FILE
        if influence_path.is_file():
            saved = json.loads(influence_path.read_text())
            self._influence = saved.get("influence")
            if saved.get("per_event_effect") is not None:
                self.per_event_effect = saved["per_event_effect"]
            self.fit_summary = saved.get("fit_summary") or {}


def _take(data: FeatureTensors, rows: np.ndarray) -> FeatureTensors:
    index = torch.as_tensor(rows, dtype=torch.int64)
    return FeatureTensors(**{name: getattr(data, name)[index] for name in data.__dataclass_fields__})


__all__ = ["TorchParams", "TorchValueModel", "resolve_device", "seed_everything", "train_network"]
