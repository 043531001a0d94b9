"""Feature rows -> tensors for the deep models (vectorised, no Python loop per row), their
standardisation statistics, and batched loading; see docs/models.md."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from uservalue.errors import InputError
from uservalue.features.online import FeatureArrays
from uservalue.features.sql import SEQUENCE_COLUMNS
from uservalue.models.base import aggregate_matrix, exposure_days


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


def hash_buckets(user_ids: pd.Series | np.ndarray, buckets: int) -> np.ndarray:
    """Stable hash of each user id into [0, buckets) (vectorised; same value on every run).

    pandas' hash_array of the ids as str: the values hash_pandas_object gives a Series of them,
    without its Series overhead (a fifth of a millisecond per call, most of one user's scoring)."""
    if buckets <= 1:  # every id lands in bucket 0: skip hashing (a served user's call pays for it otherwise)
        return np.zeros(len(user_ids), dtype=np.int64)
    ids = np.asarray(user_ids, dtype=object)
    if len(ids) and not all(isinstance(u, str) for u in ids.tolist()):
        ids = np.array([str(u) for u in ids.tolist()], dtype=object)
    hashed = pd.util.hash_array(ids, categorize=False) if len(ids) else np.zeros(0, dtype=np.uint64)
    return (hashed % np.uint64(max(buckets, 1))).astype(np.int64)


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

    def to_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "log1p": self.log1p.tolist(), "mean": self.mean.tolist(),
                "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AggregateStats:
        return cls(tuple(raw["columns"]), np.asarray(raw["log1p"], dtype=bool), np.asarray(raw["mean"]),
                   np.asarray(raw["std"]))


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

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TokenStats:
        return cls(np.asarray(raw["mean"]), np.asarray(raw["std"]))


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

    def subset(self, rows: np.ndarray) -> FeatureTensors:
        index = torch.as_tensor(rows, dtype=torch.int64)
        return FeatureTensors(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})


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


ArrayBatch = dict[str, np.ndarray]


def batch_arrays(features: FeatureArrays, columns: list[str], sequence_length: int, *,
                 user_buckets: int = 1) -> ArrayBatch:
    """FeatureTensors.batch() of every row of build_tensors(features.to_pandas(), ..., labels=False),
    as numpy arrays built straight from the online engine's output: no DataFrame, no Arrow list
    columns, and no torch op per step (numpy is several times cheaper on a few rows). The same
    values and dtypes; torch.from_numpy makes it a model batch without a copy (as_batch)."""
    n = len(features)
    L = int(sequence_length)
    lengths = features.lengths
    kept = np.minimum(lengths, L)
    width = max(int(kept.max()) if n else 0, 1)  # trimmed to the longest sequence, as batch() does
    # Each element's padded position: its place in its row, minus what is cut from the row's start.
    rows = np.repeat(np.arange(n), lengths)
    position = np.arange(int(features.offsets[-1])) - np.repeat(features.offsets[:-1], lengths)
    position -= np.repeat(np.maximum(lengths - L, 0), lengths)
    keep = position >= 0
    rows, position = rows[keep], position[keep]

    def padded_array(name: str, dtype: type) -> np.ndarray:
        values = features.sequences[name][keep]
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        out = np.zeros((n, width), dtype=dtype)
        out[rows, position] = values
        return out

    return {
        "agg": features.matrix(columns).astype(np.float32),
        "behavior": padded_array("seq_behavior", np.int64),
        "category": padded_array("seq_category", np.int32),
        "item": padded_array("seq_item", np.int32),
        "continuous": np.stack([padded_array(c, np.float32) for c in SEQUENCE_COLUMNS[3:]], axis=-1),
        "lengths": kept.astype(np.int64),
        "user_bucket": hash_buckets(features.user_id, user_buckets),
        "log_exposure": np.zeros(n, dtype=np.float32),
    }


def as_batch(arrays: ArrayBatch, device: torch.device) -> dict[str, torch.Tensor]:
    """An ArrayBatch as model inputs on `device` (zero-copy on the CPU)."""
    return to_device({k: torch.from_numpy(v) for k, v in arrays.items()}, device)


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
    order is shuffled. Batches are then trimmed to similar widths (FeatureTensors.batch),
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


def map_batches(data: FeatureTensors, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], batch_size: int,
                device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """fn(batch) on `device` for every batch of `data`, without autograd: (row index, result on CPU)."""
    # Rows in order of sequence length, so each batch is only as wide as its longest history.
    order = torch.argsort(data.lengths, stable=True)
    loader = make_loader(FeatureDataset(data, order), batch_size, shuffle=False, pin_memory=device.type == "cuda")
    results = []
    start = 0
    with torch.inference_mode():
        for batch in loader:
            n = int(batch["lengths"].shape[0])
            results.append((order[start:start + n], fn(to_device(batch, device)).cpu()))
            start += n
    return results
