"""Behaviour influence of a deep model by occlusion: f(user) - f(user without behaviour b), per user
and behaviour, as per-user shares and as a global per-event effect; see docs/models.md."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from uservalue.models.base import behavior_of_column
from uservalue.models.deep import ziln
from uservalue.models.deep.data import ArrayBatch, FeatureTensors, as_batch, map_batches

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RemovalPlan:
    """Per behaviour (index into the behaviours): (aggregate column index, how to blank it) for
    the columns it owns; and where the tenure column is (None: no such column)."""

    edits: dict[int, list[tuple[int, str]]]
    tenure: int | None


def removal_plan(columns: list[str], behaviors: tuple[str, ...]) -> RemovalPlan:
    edits: dict[int, list[tuple[int, str]]] = {}
    for i, b in enumerate(behaviors):
        own = []
        for j, column in enumerate(columns):
            if behavior_of_column(column, behaviors) != b:
                continue
            if column == f"{b}_recency_days":
                # What the SQL writes for a behaviour never seen: the user's tenure.
                own.append((j, "tenure" if "tenure_days" in columns else "keep"))
            else:
                own.append((j, "zero"))
        if f"{b}_count" in columns and "n_events" in columns:
            own.append((columns.index("n_events"), f"minus:{columns.index(f'{b}_count')}"))
        edits[i] = own
    return RemovalPlan(edits, columns.index("tenure_days") if "tenure_days" in columns else None)


def players(data: FeatureTensors, columns: list[str], behaviors: tuple[str, ...]) -> list[int]:
    """Behaviours (index into `behaviors`) that occur anywhere in `data`."""
    found = []
    for i, b in enumerate(behaviors):
        in_tokens = bool((data.behavior == i + 1).any())
        count_col = f"{b}_count"
        in_counts = count_col in columns and bool((data.agg[:, columns.index(count_col)] > 0).any())
        if in_tokens or in_counts:
            found.append(i)
    return found


def drop_tokens(batch: Batch, keep: torch.Tensor) -> Batch:
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


def without(batch: Batch, removed: list[int], plan: RemovalPlan) -> Batch:
    """The batch as if the users had no events of the behaviours `removed` (0-based ids)."""
    if not removed:
        return batch
    ids = torch.tensor([i + 1 for i in removed], device=batch["behavior"].device)
    keep = ~torch.isin(batch["behavior"], ids)
    out = drop_tokens(batch, keep)
    agg = batch["agg"].clone()
    tenure = agg[:, plan.tenure] if plan.tenure is not None else None
    for i in removed:
        for j, how in plan.edits[i]:
            if how == "zero":
                agg[:, j] = 0
            elif how == "tenure" and tenure is not None:
                agg[:, j] = tenure
            elif how.startswith("minus:"):
                agg[:, j] = (agg[:, j] - batch["agg"][:, int(how.split(":")[1])]).clamp_min(0)
    out["agg"] = agg
    return out


def event_counts(data: FeatureTensors, columns: list[str], behaviors: tuple[str, ...]) -> np.ndarray:
    counts = np.zeros((len(data), len(behaviors)))
    for i, b in enumerate(behaviors):
        if f"{b}_count" in columns:
            counts[:, i] = data.agg[:, columns.index(f"{b}_count")].double().numpy()
        else:
            counts[:, i] = (data.behavior == i + 1).sum(dim=1).double().numpy()
    return np.nan_to_num(counts)


def occlusion(
    data: FeatureTensors,
    forward: Callable[[Batch], torch.Tensor],
    columns: list[str],
    behaviors: tuple[str, ...],
    *,
    horizon_days: float,
    batch_size: int,
    device: torch.device,
    outputs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row and behaviour: f(user) - f(user without any event of that behaviour), where f is
    the predicted log expected value of `forward` (a batch -> raw float32 ZILN outputs); and each
    row's event count per behaviour. `outputs` ([rows, 3]), when given, receives the raw outputs
    for the full input."""
    found = players(data, columns, behaviors)
    plan = removal_plan(columns, behaviors)
    n_behaviors = len(behaviors)
    delta = np.zeros((len(data), n_behaviors))

    def effects(batch: Batch) -> torch.Tensor:
        raw = forward(batch)
        full = ziln.log_expected_value(raw, horizon_days).double()
        out = torch.zeros((full.shape[0], n_behaviors), dtype=torch.float64, device=full.device)
        for player in found:
            occluded = ziln.log_expected_value(forward(without(batch, [player], plan)), horizon_days)
            out[:, player] = full - occluded.double()
        return torch.cat([out, raw.double()], dim=1)

    if found or outputs is not None:
        for index, values in map_batches(data, effects, batch_size, device):
            values = values.cpu().numpy()
            delta[index.numpy()] = values[:, :n_behaviors]
            if outputs is not None:
                outputs[index.numpy()] = values[:, n_behaviors:]
    counts = event_counts(data, columns, behaviors)
    delta[counts == 0] = 0.0  # removing nothing changes nothing
    return delta, counts


def without_arrays(batch: ArrayBatch, removed: int, plan: RemovalPlan) -> ArrayBatch:
    """without(batch, [removed], plan) in numpy, for the few rows of a request (numpy's per-call
    cost is a fraction of torch's there); held equal to it by tests/model/test_fast_path.py."""
    behavior, lengths = batch["behavior"], batch["lengths"]
    valid = np.arange(behavior.shape[1])[None, :] < lengths[:, None]
    keep = (behavior != removed + 1) & valid
    rows, columns = np.nonzero(keep)
    target = (np.cumsum(keep, axis=1) - 1)[rows, columns]  # tokens kept, re-packed left-aligned
    out = dict(batch)
    for name in ("behavior", "category", "item", "continuous"):
        packed = np.zeros_like(batch[name])
        packed[rows, target] = batch[name][rows, columns]
        out[name] = packed
    out["lengths"] = keep.sum(axis=1).astype(np.int64)
    original = batch["agg"]
    agg = original.copy()
    for j, how in plan.edits[removed]:
        if how == "zero":
            agg[:, j] = 0
        elif how == "tenure" and plan.tenure is not None:
            agg[:, j] = original[:, plan.tenure]
        elif how.startswith("minus:"):
            agg[:, j] = np.maximum(original[:, j] - original[:, int(how.split(":")[1])], 0)
    out["agg"] = agg
    return out


def array_event_counts(batch: ArrayBatch, columns: list[str], behaviors: tuple[str, ...]) -> np.ndarray:
    """event_counts of an ArrayBatch."""
    counts = np.zeros((len(batch["lengths"]), len(behaviors)))
    for i, b in enumerate(behaviors):
        if f"{b}_count" in columns:
            counts[:, i] = batch["agg"][:, columns.index(f"{b}_count")]
        else:
            counts[:, i] = (batch["behavior"] == i + 1).sum(axis=1)
    return np.nan_to_num(counts)


@functools.lru_cache(maxsize=16)
def _cached_plan(columns: tuple[str, ...], behaviors: tuple[str, ...]) -> RemovalPlan:
    return removal_plan(list(columns), behaviors)


def occlusion_one_pass(
    batch: ArrayBatch,
    forward: Callable[[Batch], torch.Tensor],
    columns: list[str],
    behaviors: tuple[str, ...],
    *,
    horizon_days: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """occlusion() of a few rows with the prediction in the same forward pass: the rows and, per
    behaviour, the rows that have it with that behaviour removed, stacked along the batch dimension
    (one tensor conversion and one network call instead of 1 + behaviours; rows are scored
    independently, so the numbers are the same). Returns the rows' float32 log p_buy and log
    expected value (on the CPU), the effects and the event counts."""
    n = len(batch["lengths"])
    counts = array_event_counts(batch, columns, behaviors)
    plan = _cached_plan(tuple(columns), behaviors)
    parts, occluded = [batch], []
    for player in range(len(behaviors)):
        # Only rows that have the behaviour: removing nothing changes nothing (occlusion() zeroes them).
        rows = np.flatnonzero(counts[:, player] > 0)
        if rows.size:
            parts.append(without_arrays({k: v[rows] for k, v in batch.items()}, player, plan))
            occluded.append((player, rows))
    stacked = batch if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in batch}
    with torch.inference_mode():
        raw = forward(as_batch(stacked, device))
        log_p = ziln.log_p_buy(raw, horizon_days)
        log_ev = ziln.log_expected_value(raw, horizon_days, log_p=log_p)
    effect = log_ev.double().cpu().numpy()
    delta = np.zeros((n, len(behaviors)))
    start = n
    for player, rows in occluded:
        delta[rows, player] = effect[rows] - effect[start:start + rows.size]
        start += rows.size
    return log_p[:n].cpu(), log_ev[:n].cpu(), delta, counts


def shares(phi: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Occlusion effects as per-row shares that sum to 1."""
    magnitude = np.abs(phi)
    total = magnitude.sum(axis=1, keepdims=True)
    # Nothing moves the prediction: share equally among the behaviours the user has.
    has = (counts > 0).astype(np.float64)
    fallback = np.where(has.sum(axis=1, keepdims=True) > 0, has, 1.0)
    fallback = fallback / fallback.sum(axis=1, keepdims=True)
    return np.where(total > 0, magnitude / np.where(total > 0, total, 1.0), fallback)


def global_influence(phi: np.ndarray, counts: np.ndarray,
                     behaviors: tuple[str, ...]) -> tuple[dict[str, float], dict[str, float]]:
    """(influence shares, signed per-event effect) per behaviour: the summed effect per event of
    that behaviour, negatives clipped to 0 and normalised for the shares."""
    events = counts.sum(axis=0)
    per_event = np.where(events > 0, phi.sum(axis=0) / np.maximum(events, 1e-12), 0.0)
    positive = np.clip(per_event, 0, None)
    influence = positive / positive.sum() if positive.sum() > 0 else np.full(len(per_event), 1 / len(per_event))
    return (dict(zip(behaviors, influence.tolist(), strict=True)),
            dict(zip(behaviors, per_event.tolist(), strict=True)))
