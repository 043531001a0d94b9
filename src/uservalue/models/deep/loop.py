"""The one training loop of the deep models: ZILN loss per batch, validation loss, and
`train_network` (early stopping, per-epoch checkpoints and resume, metrics); see docs/models.md.

The same loop runs in one process or, as one of N processes started by torchrun
(uservalue.models.deep.distributed), under DistributedDataParallel: each process then takes its
shard of the training rows every epoch (ShardedBatchSampler), the losses are summed over the
processes, and only rank 0 writes checkpoints and reports metrics."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

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


def batch_loss(net: nn.Module, batch: dict[str, torch.Tensor], horizon_days: float, device: torch.device,
               forward: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None) -> torch.Tensor:
    """Per-row ZILN loss of `net` (run through `forward`, e.g. its DistributedDataParallel wrapper)."""
    with training_autocast(device):
        out = (forward or net)(batch)
    return ziln.ziln_nll(
        out.float(), net.head.beta, bought=batch["bought"], value=batch["value"],
        log_exposure=batch["log_exposure"], horizon_days=horizon_days,
    )


def loss_sums(net: nn.Module, loader: Any, horizon_days: float, device: torch.device) -> tuple[float, int]:
    """(sum of the per-row losses, rows) over `loader`, in eval mode."""
    net.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in loader:
            batch = to_device(batch, device)
            loss = batch_loss(net, batch, horizon_days, device)
            total += float(loss.double().sum())
            count += int(loss.numel())
    return total, count


def evaluate(net: nn.Module, loader: Any, horizon_days: float, device: torch.device) -> float:
    total, count = loss_sums(net, loader, horizon_days, device)
    return total / max(count, 1)


class ShardedBatchSampler(Sampler[torch.Tensor]):
    """Rank `rank`'s batches of one epoch among `world` processes (DistributedSampler's scheme on
    BatchSampler's order): every process draws the same permutation from (seed, epoch), pads it to a
    multiple of `world` with its first rows, and takes every world-th row from its rank on, so the
    processes see disjoint shards of the same size and run the same number of steps (which
    DistributedDataParallel needs). With `lengths`, the shard is length-bucketed as BatchSampler does."""

    def __init__(self, n: int, batch_size: int, *, rank: int, world: int, seed: int = 0,
                 lengths: torch.Tensor | None = None, pool: int = 50) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        self.n, self.batch_size, self.rank, self.world, self.seed = n, int(batch_size), rank, world, seed
        self.lengths, self.pool = lengths, pool
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def shard_size(self) -> int:
        return (self.n + self.world - 1) // self.world

    def __len__(self) -> int:
        return (self.shard_size + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(int(self.seed) * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator)
        padding = self.shard_size * self.world - self.n
        if padding:
            order = torch.cat([order, order.repeat(-(-padding // max(self.n, 1)))[:padding]])
        shard = order[self.rank::self.world]
        if self.lengths is None:
            yield from shard.split(self.batch_size)
            return
        batches: list[torch.Tensor] = []
        for chunk in shard.split(self.batch_size * self.pool):
            by_length = torch.argsort(self.lengths[chunk], stable=True)
            batches.extend(chunk[by_length].split(self.batch_size))
        # the same number of batches on every rank, so the same draws: the generator stays in step
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]


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
    nproc_per_node: int = 1,
) -> dict[str, Any]:
    """Fit `net` in place (best weights restored) and return the fit summary; with
    `nproc_per_node` > 1, on that many processes started by torchrun (models.deep.distributed)."""
    if nproc_per_node > 1:
        from uservalue.models.deep.distributed import train_distributed

        return train_distributed(net, data, valid, params=params, ctx=ctx, horizon_days=horizon_days,
                                 device=device, run_fingerprint=run_fingerprint, nproc_per_node=nproc_per_node)
    return fit_loop(net, data, valid, params=params, ctx=ctx, horizon_days=horizon_days, device=device,
                    run_fingerprint=run_fingerprint)


def fit_loop(
    net: nn.Module,
    data: FeatureTensors,
    valid: np.ndarray,
    *,
    params: TorchParams,
    ctx: FitContext,
    horizon_days: float,
    device: torch.device,
    run_fingerprint: str,
    rank: int = 0,
    world: int = 1,
    remove_checkpoint: bool = True,
) -> dict[str, Any]:
    """The epochs of train_network in this process: the whole run (world 1), or rank `rank`'s part
    of it inside an initialised torch.distributed process group of `world` processes."""
    started = time.perf_counter()
    cuda = device.type == "cuda"
    main = rank == 0
    train_rows = np.flatnonzero(~valid)
    valid_rows = np.flatnonzero(valid)
    if train_rows.size == 0:
        raise ConfigError("no training rows left after the validation split (lower valid_fraction)")
    train_set = FeatureDataset(data, train_rows)
    if world > 1:
        # batch_size stays the batch of one optimizer step: each process takes its share of it
        sampler = ShardedBatchSampler(len(train_set), -(-params.batch_size // world), rank=rank, world=world,
                                      seed=ctx.seed,
                                      lengths=data.lengths[train_set.rows] if params.bucket_by_length else None)
        train_loader = DataLoader(train_set, sampler=sampler, batch_size=None, num_workers=0, pin_memory=cuda)
    else:
        train_loader = make_loader(train_set, params.batch_size, shuffle=True, seed=ctx.seed, pin_memory=cuda,
                                   bucket=params.bucket_by_length)
    # Validation in order of sequence length: narrow batches for short histories, same loss
    # (each process scores every world-th of them; the sums are added up).
    valid_sorted = valid_rows[np.argsort(data.lengths.numpy()[valid_rows], kind="stable")][rank::world]
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
        state = _resume_state(checkpoint_path, run_fingerprint, main, world)
        if state is not None:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, best_loss, best_epoch = state["epoch"], state["best_loss"], state["best_epoch"]
            bad_epochs, done, best_state = state["bad_epochs"], state["done"], state["best_state"]
            history = list(state.get("history", []))
            set_rng_state(state["rng_ranks"][rank] if world > 1 else state["rng"])
            resumed_from = start_epoch
            if main:
                log.info("resuming from %s after epoch %d", checkpoint_path, start_epoch)
    forward: nn.Module = net
    if world > 1:
        # after any resume: every process holds the same weights; buffers are constants (no sync)
        forward = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if cuda else None,
                                                      broadcast_buffers=False)

    epoch = start_epoch
    with deterministic(not cuda):
        while not done and epoch < params.max_epochs:
            epoch += 1
            epoch_start = time.perf_counter()
            train_loader.sampler.set_epoch(epoch)
            forward.train()
            total = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no sync per step
            count = 0
            for batch in train_loader:
                batch = to_device(batch, device)
                loss = batch_loss(net, batch, horizon_days, device, forward).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(net.parameters(), params.grad_clip)
                optimizer.step()
                n = int(batch["bought"].shape[0])
                total += loss.detach().double() * n
                count += n
            train_total, count = _summed(float(total), count, world, device)
            train_loss = train_total / max(count, 1)
            train_seconds = time.perf_counter() - epoch_start
            if valid_loader is not None:
                valid_total, valid_count = _summed(*loss_sums(net, valid_loader, horizon_days, device), world, device)
                valid_loss = valid_total / max(valid_count, 1)
            else:
                valid_loss = train_loss
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
            rng = _gathered_rng(world) if checkpoint_path is not None else []
            if not main:
                continue
            log.info("epoch %d: train %.5f valid %.5f (%.1f s, %.0f rows/s)", epoch, train_loss, valid_loss,
                     metrics["epoch_seconds"], metrics["samples_per_second"])
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, {
                    "fingerprint": run_fingerprint, "epoch": epoch, "model": cpu_state(net),
                    "optimizer": optimizer.state_dict(), "best_state": best_state, "best_loss": best_loss,
                    "best_epoch": best_epoch, "bad_epochs": bad_epochs, "done": done, "history": history,
                    **({"rng_ranks": rng} if world > 1 else {"rng": rng[0]}),
                })
            ctx.log_metrics(metrics, epoch)

    net.load_state_dict(best_state)
    net.eval()
    if checkpoint_path is not None and remove_checkpoint and main:
        checkpoint_path.unlink(missing_ok=True)
    return {
        "best_epoch": best_epoch,
        "best_valid_loss": best_loss,
        "epochs_run": epoch,
        "resumed_from_epoch": resumed_from,
        "device": device.type,
        "processes": world,
        "train_rows": int(train_rows.size),
        "valid_rows": int(valid_rows.size),
        "total_seconds": time.perf_counter() - started,
    }


def _summed(total: float, count: int, world: int, device: torch.device) -> tuple[float, int]:
    """(total, count) added up over the processes (as they are in one process)."""
    if world == 1:
        return total, count
    both = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(both)
    return float(both[0]), int(both[1])


def _gathered_rng(world: int) -> list[dict[str, Any]]:
    """Every process's RNG state, by rank (each process draws its own dropout masks)."""
    if world == 1:
        return [rng_state()]
    states: list[Any] = [None] * world
    torch.distributed.all_gather_object(states, rng_state())
    return states


def _resume_state(path: Path, run_fingerprint: str, main: bool, world: int) -> dict[str, Any] | None:
    """The checkpoint to resume from: rank 0 checks it (and deletes a foreign one), tells the others
    whether to resume, and they read the same file."""
    if world == 1:
        return load_checkpoint(path, run_fingerprint)
    state = load_checkpoint(path, run_fingerprint) if main else None
    resume = [state is not None and len(state.get("rng_ranks", ())) == world]
    torch.distributed.broadcast_object_list(resume, src=0)
    if not resume[0]:
        state = None
    elif not main:
        state = torch.load(path, map_location="cpu", weights_only=True)
    torch.distributed.barrier()  # every rank has read it before rank 0 writes the next one
    return state
