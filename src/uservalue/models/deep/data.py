"""Feature rows -> tensors for the deep models, vectorised end to end (no Python loop per row).

- aggregates: kept *raw* (float32) in the tensors; the network standardises them itself with
  buffers fitted here on the training rows (`AggregateStats`): log1p of every column that is
  non-negative on the training rows, then (x - mean) / std, NaN -> 0. Keeping the transform
  inside the network lets the behaviour attribution edit raw counts ("this user without carts")
  and lets the statistics travel in the model's state_dict.
- sequences: the list columns (last L events before the cutoff, oldest first) become left-aligned
  padded [N, L] tensors (padding at the end, id 0) via Arrow's flatten/parent indices; the three
  continuous token features (log age, log gap, log amount) are stacked as [N, L, 3].
- exposure: log(label_days / horizon) per training row (0 when scoring, i.e. d = horizon).
- labels: bought and value.

`FeatureDataset` serves whole batches from these tensors (one index tensor per batch instead of
one call per row), trimmed to the longest sequence in the batch; `make_loader` wraps it in a
DataLoader with pinned memory on CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from uservalue.errors import InputError
from uservalue.features.sql import SEQUENCE_COLUMNS
from uservalue.models.base import aggregate_matrix, exposure_days

ID_COLUMNS = ("seq_behavior", "seq_category", "seq_item")
CONTINUOUS_COLUMNS = ("seq_log_age_days", "seq_log_gap_days", "seq_log_amount")


# --------------------------------------------------------------------------------------------
# list columns -> padded arrays
# --------------------------------------------------------------------------------------------
def _list_array(series: pd.Series) -> pa.Array:
    """A pandas column of lists (numpy arrays from Parquet, or Arrow-backed) as one Arrow array."""
    try:
        array = pa.array(series, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise InputError("features", f"cannot read list column: {error}", column=str(series.name)) from None
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_null(array.type):  # empty, or nothing but nulls
        array = pa.nulls(len(array), pa.list_(pa.float32()))
    if not pa.types.is_list(array.type) and not pa.types.is_large_list(array.type):
        raise InputError("features", "expected a list column", column=str(series.name), found=str(array.type))
    return array


@dataclass(frozen=True)
class _Layout:
    """Where each flattened list element lands in the padded [N, length] array."""

    n: int
    length: int
    lengths: np.ndarray  # elements per row (before truncation)
    rows: np.ndarray  # target row of each kept element
    columns: np.ndarray  # target column of each kept element
    keep: np.ndarray  # which flattened elements are among their row's last `length`

    @classmethod
    def of(cls, array: pa.Array, length: int) -> _Layout:
        lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        rows = pc.list_parent_indices(array).to_numpy(zero_copy_only=False).astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        column = np.arange(rows.size, dtype=np.int64)
        column -= starts[rows]
        column -= np.maximum(lengths - length, 0)[rows]
        keep = column >= 0
        return cls(len(array), length, lengths, rows[keep], column[keep], keep)

    def fill(self, array: pa.Array, dtype: np.dtype | type) -> np.ndarray:
        values = pc.list_flatten(array).to_numpy(zero_copy_only=False)
        if values.dtype.kind == "f":
            values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        elif values.dtype == object:  # nulls inside an integer list
            values = pd.Series(values).fillna(0).to_numpy()
        out = np.zeros((self.n, self.length), dtype=dtype)
        out[self.rows, self.columns] = values[self.keep]
        return out


def padded_columns(frame: pd.DataFrame, names: tuple[str, ...], length: int,
                   dtypes: tuple[np.dtype | type, ...]) -> tuple[list[np.ndarray], np.ndarray]:
    """[N, length] arrays of each row's last `length` list elements, left-aligned and zero-padded
    at the end, plus the number of elements kept per row. Columns with the same list lengths
    (the seq_* columns always have) share one layout."""
    layout: _Layout | None = None
    out = []
    for name, dtype in zip(names, dtypes, strict=True):
        array = _list_array(frame[name])
        if layout is None or not np.array_equal(
            pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False), layout.lengths
        ):
            if layout is not None:
                raise InputError("features", "sequence columns differ in length", column=name)
            layout = _Layout.of(array, length)
        out.append(layout.fill(array, dtype))
    assert layout is not None
    return out, np.minimum(layout.lengths, length)


def padded(series: pd.Series, length: int, dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray]:
    """One list column as a padded [N, length] array (see padded_columns)."""
    (out,), lengths = padded_columns(series.to_frame(), (series.name,), length, (dtype,))
    return out, lengths


def hash_buckets(user_ids: pd.Series, buckets: int) -> np.ndarray:
    """Stable hash of each user id into [0, buckets) (vectorised; same value on every run)."""
    hashed = pd.util.hash_pandas_object(user_ids.astype(str).reset_index(drop=True), index=False)
    return (hashed.to_numpy(dtype=np.uint64) % np.uint64(max(buckets, 1))).astype(np.int64)


# --------------------------------------------------------------------------------------------
# standardisation statistics
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AggregateStats:
    """log1p mask, mean and std per aggregate column, fitted on the training rows."""

    columns: tuple[str, ...]
    log1p: np.ndarray  # bool [F]
    mean: np.ndarray  # float [F], of the (log1p) values
    std: np.ndarray  # float [F]

    @classmethod
    def fit(cls, raw: np.ndarray, columns: list[str]) -> AggregateStats:
        with np.errstate(invalid="ignore"):
            finite = np.where(np.isfinite(raw), raw, np.nan)
            all_nan = np.all(np.isnan(finite), axis=0)
            minimum = np.nanmin(np.where(all_nan, 0.0, finite), axis=0)
            log1p = minimum >= 0
            values = transform_numpy(finite, log1p)
            mean = np.nanmean(np.where(all_nan, 0.0, values), axis=0)
            std = np.nanstd(np.where(all_nan, 0.0, values), axis=0)
        mean = np.nan_to_num(mean)
        std = np.where(~np.isfinite(std) | (std < 1e-6), 1.0, std)
        return cls(tuple(columns), log1p.astype(bool), mean.astype(np.float64), std.astype(np.float64))


def transform_numpy(raw: np.ndarray, log1p: np.ndarray) -> np.ndarray:
    return np.where(log1p, np.log1p(np.clip(raw, 0, None)), raw)


@dataclass(frozen=True)
class TokenStats:
    """mean and std of the continuous token features over real (non-padding) events."""

    mean: np.ndarray  # [3]
    std: np.ndarray  # [3]

    @classmethod
    def fit(cls, continuous: np.ndarray, lengths: np.ndarray) -> TokenStats:
        valid = np.arange(continuous.shape[1])[None, :] < lengths[:, None]
        values = continuous[valid]
        if values.size == 0:
            return cls(np.zeros(continuous.shape[2]), np.ones(continuous.shape[2]))
        mean = values.mean(axis=0, dtype=np.float64)
        std = values.std(axis=0, dtype=np.float64)
        return cls(mean, np.where(std < 1e-6, 1.0, std))


# --------------------------------------------------------------------------------------------
# the tensors
# --------------------------------------------------------------------------------------------
@dataclass
class FeatureTensors:
    """Everything the deep models read, one row per feature row."""

    agg: torch.Tensor  # float32 [N, F], raw aggregates
    behavior: torch.Tensor  # uint8 [N, L], 1..n_behaviors, 0 = padding
    category: torch.Tensor  # int32 [N, L]
    item: torch.Tensor  # int32 [N, L]
    continuous: torch.Tensor  # float32 [N, L, 3]
    lengths: torch.Tensor  # int64 [N]
    user_bucket: torch.Tensor  # int64 [N]
    log_exposure: torch.Tensor  # float32 [N], log(d / horizon)
    bought: torch.Tensor  # float32 [N]
    value: torch.Tensor  # float32 [N]

    def __len__(self) -> int:
        return int(self.agg.shape[0])

    @property
    def has_labels(self) -> bool:
        return bool(torch.isfinite(self.value).all())

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows `index` as model inputs, trimmed to the longest sequence among them."""
        lengths = self.lengths[index]
        width = max(int(lengths.max()) if len(lengths) else 1, 1)
        return {
            "agg": self.agg[index],
            "behavior": self.behavior[index, :width].long(),
            "category": self.category[index, :width],
            "item": self.item[index, :width],
            "continuous": self.continuous[index, :width],
            "lengths": lengths,
            "user_bucket": self.user_bucket[index],
            "log_exposure": self.log_exposure[index],
            "bought": self.bought[index],
            "value": self.value[index],
        }


def build_tensors(
    frame: pd.DataFrame,
    columns: list[str],
    sequence_length: int,
    horizon_days: float,
    *,
    user_buckets: int = 1,
    labels: bool = True,
) -> FeatureTensors:
    """Convert feature rows. With labels=False (scoring) the exposure is the horizon and the
    label tensors are NaN."""
    n = len(frame)
    raw = aggregate_matrix(frame, columns).astype(np.float32)
    missing = [c for c in SEQUENCE_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError("features", f"missing sequence columns {missing}",
                         expected="the featurize stage's seq_* list columns")
    L = int(sequence_length)
    (behavior, category, item, *continuous), lengths = padded_columns(
        frame, SEQUENCE_COLUMNS, L, (np.uint8, np.int32, np.int32, np.float32, np.float32, np.float32)
    )
    continuous = np.stack(continuous, axis=-1)
    if labels:
        for column in ("value", "bought"):
            if column not in frame.columns:
                raise InputError("features", f"missing label column '{column}'", column=column)
        days = exposure_days(frame, horizon_days)
        log_exposure = np.log(days / float(horizon_days))
        value = np.nan_to_num(frame["value"].to_numpy(dtype=np.float64), nan=0.0)
        if np.any(value < 0):
            raise InputError("features", "negative value label", column="value")
        bought = frame["bought"].to_numpy(dtype=np.float64) > 0
        bought = bought | (value > 0)
    else:
        log_exposure = np.zeros(n)
        value = np.full(n, np.nan)
        bought = np.full(n, np.nan)
    return FeatureTensors(
        agg=torch.from_numpy(np.ascontiguousarray(raw)),
        behavior=torch.from_numpy(behavior),
        category=torch.from_numpy(category),
        item=torch.from_numpy(item),
        continuous=torch.from_numpy(np.ascontiguousarray(continuous)),
        lengths=torch.from_numpy(lengths),
        user_bucket=torch.from_numpy(hash_buckets(frame["user_id"], user_buckets)),
        log_exposure=torch.from_numpy(log_exposure.astype(np.float32)),
        bought=torch.from_numpy(np.asarray(bought, dtype=np.float32)),
        value=torch.from_numpy(value.astype(np.float32)),
    )


# --------------------------------------------------------------------------------------------
# Dataset / DataLoader
# --------------------------------------------------------------------------------------------
class FeatureDataset(Dataset):
    """A map-style dataset whose keys are whole batches (index tensors) of a row subset."""

    def __init__(self, tensors: FeatureTensors, rows: np.ndarray | torch.Tensor | None = None) -> None:
        self.tensors = tensors
        self.rows = (torch.arange(len(tensors)) if rows is None else torch.as_tensor(rows, dtype=torch.int64))

    def __len__(self) -> int:
        return int(self.rows.numel())

    def __getitem__(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.tensors.batch(self.rows[positions])


class BatchSampler(Sampler[torch.Tensor]):
    """Batches of positions, in order or shuffled by a generator seeded with (seed, epoch) - an
    epoch's order depends on nothing else, which makes resuming exact.

    With `lengths`, shuffled batches are length-bucketed: the shuffled rows are cut into pools of
    `pool` batches, each pool is sorted by sequence length and cut into batches, and the batch
    order is shuffled. Batches are then trimmed to similar widths (tensors.FeatureTensors.batch),
    which on logs where most users have a few events (CDNOW) is several times cheaper."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int = 0,
                 lengths: torch.Tensor | None = None, pool: int = 50) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, int(batch_size), shuffle, seed
        self.lengths, self.pool = lengths, pool
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        if not self.shuffle:
            yield from torch.arange(self.n).split(self.batch_size)
            return
        generator = torch.Generator().manual_seed(int(self.seed) * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator)
        if self.lengths is None:
            yield from order.split(self.batch_size)
            return
        batches: list[torch.Tensor] = []
        for chunk in order.split(self.batch_size * self.pool):
            by_length = torch.argsort(self.lengths[chunk], stable=True)
            batches.extend(chunk[by_length].split(self.batch_size))
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]


def make_loader(dataset: FeatureDataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                pin_memory: bool = False, bucket: bool = False) -> DataLoader:
    lengths = dataset.tensors.lengths[dataset.rows] if bucket else None
    sampler = BatchSampler(len(dataset), batch_size, shuffle=shuffle, seed=seed, lengths=lengths)
    # batch_size=None: the sampler's index tensors are the keys, the dataset returns whole batches.
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0, pin_memory=pin_memory)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# "this user without behaviour b": the counterfactual the attribution uses
# --------------------------------------------------------------------------------------------
def drop_tokens(batch: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch with only the tokens where `keep` is true, re-packed left-aligned."""
    valid = torch.arange(batch["behavior"].shape[1], device=keep.device)[None, :] < batch["lengths"][:, None]
    keep = keep & valid
    new_lengths = keep.sum(dim=1)
    column = torch.cumsum(keep.long(), dim=1) - 1
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)
    out = dict(batch)
    for name in ("behavior", "category", "item", "continuous"):
        source = batch[name]
        target = torch.zeros_like(source)
        target[rows[keep], column[keep]] = source[keep]
        out[name] = target
    out["lengths"] = new_lengths
    return out


# --------------------------------------------------------------------------------------------
# the standardisation as part of the network (its statistics live in the state_dict)
# --------------------------------------------------------------------------------------------
class AggregateNorm(nn.Module):
    """raw aggregates -> log1p where fitted -> (x - mean) / std -> NaN to 0."""

    def __init__(self, stats: AggregateStats) -> None:
        super().__init__()
        self.register_buffer("log1p", torch.as_tensor(stats.log1p, dtype=torch.bool))
        self.register_buffer("mean", torch.as_tensor(stats.mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(stats.std, dtype=torch.float32))

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        raw = raw.float()
        x = torch.where(self.log1p, torch.log1p(raw.clamp_min(0)), raw)
        return torch.nan_to_num((x - self.mean) / self.std, nan=0.0, posinf=0.0, neginf=0.0).clamp(-10, 10)


class TokenNorm(nn.Module):
    def __init__(self, stats: TokenStats) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(stats.mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(stats.std, dtype=torch.float32))

    def forward(self, continuous: torch.Tensor) -> torch.Tensor:
        return (continuous.float() - self.mean) / self.std


def rows_per_id(ids: torch.Tensor, lengths: torch.Tensor, buckets: int) -> np.ndarray:
    """How many rows hold each id (0..buckets) among their first `lengths` events (ids > 0 only)."""
    valid = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
    ids = torch.where(valid, ids.long(), torch.zeros((), dtype=torch.long))
    ordered, _ = torch.sort(ids, dim=1)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    chosen = ordered[first & (ordered > 0)]
    return torch.bincount(chosen, minlength=buckets + 1)[: buckets + 1].numpy()


class HashedEmbedding(nn.Module):
    """An embedding of hashed ids (0 = none/padding, a zero vector) whose ids held by fewer than
    `min_rows` training rows are read as 0: a rare id mostly identifies its few users, so learning
    it memorises their labels instead of anything that carries over to other users."""

    def __init__(self, buckets: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(buckets + 1, dim, padding_idx=0)
        nn.init.normal_(self.table.weight, std=0.1)
        with torch.no_grad():
            self.table.weight[0].zero_()
        self.register_buffer("known", torch.ones(buckets + 1, dtype=torch.bool))

    def set_vocabulary(self, rows: np.ndarray, min_rows: int) -> None:
        known = torch.as_tensor(rows >= min_rows, dtype=torch.bool)
        known[0] = False
        self.known.copy_(known)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        return self.table(torch.where(self.known[ids], ids, torch.zeros_like(ids)))
