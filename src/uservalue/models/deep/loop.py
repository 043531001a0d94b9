"""The one training loop of the deep models: ZILN loss per batch, validation loss, and
`train_network` (early stopping, per-epoch checkpoints and resume, metrics); see docs/models.md."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from uservalue.errors import ConfigError
from uservalue.models.base import FitContext
from uservalue.models.deep import ziln
from uservalue.models.deep.checkpoints import (
    CHECKPOINT_FILE,
    cpu_state,
    load_checkpoint,
    save_checkpoint,
)
from uservalue.models.deep.data import FeatureDataset, FeatureTensors, make_loader, to_device
from uservalue.models.deep.runtime import deterministic, rng_state, set_rng_state, training_autocast

if TYPE_CHECKING:
    from uservalue.models.deep.model import TorchParams

log = logging.getLogger(__name__)

MIN_RELATIVE_IMPROVEMENT = 1e-4


def batch_loss(net: nn.Module, batch: dict[str, torch.Tensor], horizon_days: float, device: torch.device) -> torch.Tensor:
    with training_autocast(device):
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
    best_state = cpu_state(net)
    history: list[dict[str, float]] = []
    resumed_from = 0
    if checkpoint_path is not None:
        state = load_checkpoint(checkpoint_path, run_fingerprint)
        if state is not None:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, best_loss, best_epoch = state["epoch"], state["best_loss"], state["best_epoch"]
            bad_epochs, done, best_state = state["bad_epochs"], state["done"], state["best_state"]
            history = list(state.get("history", []))
            set_rng_state(state["rng"])
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
                best_state = cpu_state(net)
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
                save_checkpoint(checkpoint_path, {
                    "fingerprint": run_fingerprint, "epoch": epoch, "model": cpu_state(net),
                    "optimizer": optimizer.state_dict(), "best_state": best_state, "best_loss": best_loss,
                    "best_epoch": best_epoch, "bad_epochs": bad_epochs, "done": done, "history": history,
                    "rng": rng_state(),
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
