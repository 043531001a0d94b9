"""Behaviour influence, defined once for every model that sees behaviours (docs/models.md, "Behaviour
influence"): two quantities computed from the model's predictions alone, so a new model gets them
for free.

- `effect[b]`: the expected change in expected_value (and p_buy) when one more event of behaviour
  `b` is added to a user's history at the cutoff: counterfactual insertion of that event into the
  feature row (`insert_event`, held equal to the feature engine run on the events plus the inserted
  one by tests/model/test_influence.py), averaged over a sample of users, with a 95% confidence
  interval from the users' spread.
- `share[b]`: each behaviour's share of a user's prediction above the no-behaviour baseline: exact
  Shapley values over behaviour groups (every behaviour of the spec, the purchase history
  included, is one player), the value of a coalition being the model's expected_value with the
  other behaviours' events occluded from the feature row (`remove_behaviors`). Shares are the
  positive Shapley values normalised to sum to 1 (a behaviour that lowers the prediction gets 0);
  see shares_from_phi for a user whom nothing lifts above the baseline.

Everything here reads the model through `predict_outputs(FeatureArrays) -> (p_buy, expected_value)`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Protocol

import numpy as np
import pandas as pd

from uservalue.errors import InputError
from uservalue.features.online import FeatureArrays, _log_f32, output_schema
from uservalue.features.sql import SECONDS_PER_DAY, SEQUENCE_COLUMNS, FeatureSpec
from uservalue.schema import PURCHASE

METHOD = "shapley-behaviour-groups"
EFFECT_METHOD = "insertion-one-event-at-cutoff"
INSERT_BEFORE_SECONDS = 1.0  # the inserted event's time: this long before the cutoff
Z_95 = 1.959963984540054


class Predictor(Protocol):
    spec: FeatureSpec

    def predict_outputs(self, features: FeatureArrays) -> tuple[np.ndarray, np.ndarray]: ...


# -- feature rows ------------------------------------------------------------------------------
def arrays_from_frame(frame: pd.DataFrame, spec: FeatureSpec) -> FeatureArrays:
    """A feature DataFrame (build_features' rows, or an MLflow model input with sequences as lists)
    as FeatureArrays: the aggregates in the feature engine's types, the sequences flattened. A
    frame without sequence columns gets empty sequences; without `cutoff`, cutoff 0."""
    schema = output_schema(spec)
    n = len(frame)
    missing = [c for c in spec.aggregate_columns() if c not in frame.columns]
    if missing:
        raise InputError("features", f"missing feature columns {missing}", expected="the featurize stage's columns")
    aggregates: dict[str, np.ndarray] = {}
    for column in spec.aggregate_columns():
        dtype = schema.field(column).type.to_pandas_dtype()
        values = frame[column].to_numpy(dtype=np.float64, na_value=np.nan)
        # Integer columns cannot hold a missing value (the engine writes none); floats keep theirs.
        aggregates[column] = (np.nan_to_num(values) if np.issubdtype(dtype, np.integer) else values).astype(dtype)
    if "cutoff" in frame.columns:
        cutoff = pd.to_datetime(frame["cutoff"], utc=True)
        cutoff_us = ((cutoff - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)).to_numpy(dtype=np.int64)
    else:
        cutoff_us = np.zeros(n, dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    sequences: dict[str, np.ndarray] = {}
    if all(c in frame.columns for c in SEQUENCE_COLUMNS) and n:
        lengths = np.fromiter((0 if v is None else len(v) for v in frame[SEQUENCE_COLUMNS[0]]), np.int64, n)
        np.cumsum(lengths, out=offsets[1:])
        for c in SEQUENCE_COLUMNS:
            dtype = schema.field(c).type.value_type.to_pandas_dtype()
            parts = [np.asarray(v, dtype=np.float64) for v in frame[c] if v is not None and len(v)]
            sequences[c] = np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype=dtype)
    else:
        for c in SEQUENCE_COLUMNS:
            sequences[c] = np.empty(0, dtype=schema.field(c).type.value_type.to_pandas_dtype())
    user_id = frame["user_id"].astype(str).to_numpy(dtype=object)
    return FeatureArrays(spec, user_id, cutoff_us, aggregates, offsets, sequences)


def _with(features: FeatureArrays, aggregates: dict[str, np.ndarray], offsets: np.ndarray,
          sequences: dict[str, np.ndarray]) -> FeatureArrays:
    return FeatureArrays(features.spec, features.user_id, features.cutoff_us, aggregates, offsets, sequences)


def insert_event(features: FeatureArrays, behavior: str) -> FeatureArrays:
    """Every row as if its user had one more event of `behavior` (not the purchase: it would need
    an amount) INSERT_BEFORE_SECONDS before the cutoff, on the item and category of the user's last
    event, amount 0: the feature engine's row for the events plus that one (online_arrays),
    computed from the row alone."""
    spec = features.spec
    if behavior == PURCHASE or behavior not in spec.behaviors:
        raise ValueError(f"insert_event: {behavior!r} is not a non-purchase behaviour of {spec.behaviors}")
    agg = {c: v.copy() for c, v in features.aggregates.items()}
    T = features.cutoff_us.astype(np.float64) / 1e6
    t_new = T - INSERT_BEFORE_SECONDS
    n = features.aggregates["n_events"].astype(np.int64)
    t_max = T - features.aggregates["recency_days"] * SECONDS_PER_DAY
    t_min = T - features.aggregates["tenure_days"] * SECONDS_PER_DAY
    age = (T - t_new) / SECONDS_PER_DAY
    new_day = np.floor(t_new / SECONDS_PER_DAY) != np.floor(np.round(t_max, 6) / SECONDS_PER_DAY)
    agg["n_events"] = (n + 1).astype(agg["n_events"].dtype)
    agg["recency_days"] = age
    agg["active_days"] = (agg["active_days"] + new_day).astype(agg["active_days"].dtype)
    agg["mean_gap_days"] = (t_new - t_min) / SECONDS_PER_DAY / np.maximum(n, 1)
    agg[f"{behavior}_count"] = agg[f"{behavior}_count"] + 1
    for w in spec.windows_days:
        agg[f"{behavior}_count_{w}d"] = agg[f"{behavior}_count_{w}d"] + 1
    agg[f"{behavior}_recency_days"] = age
    # The sequence: the new token appended, the oldest dropped when the row is full.
    lengths = features.lengths
    last = features.offsets[1:] - 1
    has = lengths > 0
    L = spec.sequence_length
    new_lengths = np.minimum(lengths + 1, L)
    offsets = np.zeros(len(features) + 1, dtype=np.int64)
    np.cumsum(new_lengths, out=offsets[1:])
    drop = np.zeros(int(features.offsets[-1]), dtype=bool)
    full = np.flatnonzero(lengths >= L)
    drop[features.offsets[:-1][full]] = True
    keep_old = ~drop
    new_position = offsets[1:] - 1  # the new token closes each row
    def last_of(c: str) -> np.ndarray:
        values = features.sequences[c]
        return np.where(has, values[np.maximum(last, 0)], 0) if len(values) else np.zeros(len(features))

    token = {
        "seq_behavior": np.full(len(features), spec.behaviors.index(behavior) + 1),
        "seq_category": last_of("seq_category"),
        "seq_item": last_of("seq_item"),
        "seq_log_age_days": _log_f32(1 + age),
        "seq_log_gap_days": np.where(has, _log_f32(1 + np.maximum(t_new - t_max, 0) / SECONDS_PER_DAY), 0),
        "seq_log_amount": _log_f32(np.ones(len(features))),
    }
    slot = np.ones(int(offsets[-1]), dtype=bool)
    slot[new_position] = False
    sequences = {}
    for c in SEQUENCE_COLUMNS:
        old = features.sequences[c]
        out = np.empty(int(offsets[-1]), dtype=old.dtype)
        out[slot] = old[keep_old]
        out[new_position] = np.asarray(token[c]).astype(old.dtype)
        sequences[c] = out
    return _with(features, agg, offsets, sequences)


def remove_behaviors(features: FeatureArrays, removed: Sequence[str]) -> FeatureArrays:
    """Every row with the events of the `removed` behaviours occluded: the columns each owns set to
    what the feature SQL writes for a user who never did it (counts and sums 0, its recency the
    tenure), n_events reduced by its count and its tokens dropped from the sequence. Columns no
    behaviour owns (recency, tenure, active days, distinct items) are kept: the row cannot tell
    which events they came from."""
    if not removed:
        return features
    spec = features.spec
    agg = {c: v.copy() for c, v in features.aggregates.items()}
    ids = []
    tenure = features.aggregates["tenure_days"]
    for b in removed:
        ids.append(spec.behaviors.index(b) + 1)
        count = features.aggregates.get(f"{b}_count")
        if count is not None:
            agg["n_events"] = np.maximum(agg["n_events"] - count, 0).astype(agg["n_events"].dtype)
        for column, values in list(agg.items()):
            if behavior_of_column(column, spec.behaviors) != b:
                continue
            agg[column] = (tenure if column == f"{b}_recency_days" else np.zeros_like(values)).astype(values.dtype)
    keep = ~np.isin(features.sequences["seq_behavior"], ids)
    rows = np.repeat(np.arange(len(features)), features.lengths)
    offsets = np.zeros(len(features) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows[keep], minlength=len(features)), out=offsets[1:])
    return _with(features, agg, offsets, {c: v[keep] for c, v in features.sequences.items()})


@functools.lru_cache(maxsize=16)
def _owners(columns: tuple[str, ...], behaviors: tuple[str, ...]) -> dict[str, tuple[int | None, bool]]:
    """Per aggregate column: (index of the behaviour that owns it or None, whether it is its recency)."""
    out: dict[str, tuple[int | None, bool]] = {}
    for column in columns:
        owner = behavior_of_column(column, behaviors)
        out[column] = (None, False) if owner is None else (behaviors.index(owner), column == f"{owner}_recency_days")
    return out


def behavior_of_column(column: str, behaviors: tuple[str, ...]) -> str | None:
    """Which behaviour an aggregate column describes (`cart_count_7d` -> cart; monetary, purchase
    days and BTYD -> the purchase behaviour; n_events, recency, tenure... -> None)."""
    for b in behaviors:
        if column.startswith(f"{b}_"):
            return b
    if column.startswith(("monetary_", "btyd_")) or column == "purchase_days":
        return PURCHASE
    return None


def event_counts(features: FeatureArrays) -> np.ndarray:
    """[rows, behaviours]: each row's events of each behaviour (its `<b>_count`)."""
    return np.column_stack([np.asarray(features.aggregates[f"{b}_count"], dtype=np.float64)
                            for b in features.spec.behaviors]) if len(features.spec.behaviors) else \
        np.zeros((len(features), 0))


# -- share: Shapley over behaviour groups -------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _coalitions(k: int) -> tuple[tuple[int, ...], ...]:
    """Every subset of k players (the behaviours kept), smallest first: () first, all k last."""
    return tuple(c for size in range(k + 1) for c in combinations(range(k), size))


@functools.lru_cache(maxsize=8)
def _shapley_weights(k: int) -> np.ndarray:
    """[player, coalition] such that phi = weights @ v (v: each coalition's value, _coalitions order):
    phi_i = sum over S without i of |S|! (k - |S| - 1)! / k! (v(S + i) - v(S))."""
    coalitions = _coalitions(k)
    index = {kept: j for j, kept in enumerate(coalitions)}
    weights = np.zeros((k, len(coalitions)))
    for kept in coalitions:
        if len(kept) == k:
            continue
        w = math.factorial(len(kept)) * math.factorial(k - len(kept) - 1) / math.factorial(k)
        for i in range(k):
            if i not in kept:
                weights[i, index[tuple(sorted((*kept, i)))]] += w
                weights[i, index[kept]] -= w
    weights.flags.writeable = False  # cached: shared by every call
    return weights


@dataclass(frozen=True)
class _CoalitionMasks:
    """_coalitions(k) as bit masks, built once per k (read-only arrays shared by every call)."""

    bits: np.ndarray  # [behaviour]: 1 << i
    mask: np.ndarray  # [coalition]: the bits of the behaviours it keeps
    index_of: np.ndarray  # [2^k]: the coalition of each mask
    removed: np.ndarray  # [coalition, behaviour]: whether the coalition leaves the behaviour out


@functools.lru_cache(maxsize=8)
def _coalition_masks(k: int) -> _CoalitionMasks:
    bits = 1 << np.arange(k, dtype=np.int64)
    mask = np.array([int(bits[list(kept)].sum()) for kept in _coalitions(k)], dtype=np.int64)
    index_of = np.empty(1 << k, dtype=np.int64)
    index_of[mask] = np.arange(len(mask))
    removed = (mask[:, None] & bits[None, :]) == 0
    for array in (bits, mask, index_of, removed):
        array.flags.writeable = False
    return _CoalitionMasks(bits, mask, index_of, removed)


def coalition_rows(features: FeatureArrays, coalitions: Sequence[tuple[int, ...]]) -> FeatureArrays:
    """The rows once per coalition (behaviour indices kept), stacked coalition after coalition: each
    copy is remove_behaviors(features, <the behaviours not kept>), built in one pass per column (a
    request's few rows pay numpy's per-call cost once, not once per coalition)."""
    n, c = len(features), len(coalitions)
    removed = np.ones((c, len(features.spec.behaviors)), dtype=bool)  # [coalition, behaviour]: removed in that copy
    for j, kept in enumerate(coalitions):
        removed[j, list(kept)] = False
    # row of each stacked row (indexing beats np.tile per column)
    return _occluded_copies(features, np.tile(np.arange(n), c), np.repeat(removed, n, axis=0))


@dataclass(frozen=True)
class _Block:
    """Aggregate columns of one dtype, handled as one [columns, rows] array (numpy's per-call cost
    paid per dtype, not per column): which of them a behaviour owns, and how occlusion writes them."""

    names: tuple[str, ...]
    owned: np.ndarray  # positions (in names) of the columns a behaviour owns
    owner: np.ndarray  # [owned]: the index of that behaviour
    recency: np.ndarray  # [owned, 1]: the column is its owner's recency (occluded to the tenure; the rest to 0)
    has_recency: bool
    member: np.ndarray  # [behaviour, owned] float64: 1 where the behaviour owns the column


@dataclass(frozen=True)
class _AggregatePlan:
    blocks: tuple[_Block, ...]
    slots: tuple[tuple[str, int, int], ...]  # per aggregate column in its order: (name, block, row in block)
    counts: tuple[str, ...]  # the `<b>_count` columns present, of behaviours counts_at
    counts_at: np.ndarray  # their behaviour indices


@functools.lru_cache(maxsize=16)
def _aggregate_plan(columns: tuple[str, ...], dtypes: tuple[np.dtype, ...], behaviors: tuple[str, ...]) -> _AggregatePlan:
    """The columns grouped by dtype (in first-appearance order), with _owners' roles, per (columns,
    their dtypes, behaviours): computed once, not per request."""
    owners = _owners(columns, behaviors)
    groups: dict[np.dtype, list[str]] = {}
    for column, dtype in zip(columns, dtypes, strict=True):
        groups.setdefault(dtype, []).append(column)
    blocks, where = [], {}
    for b, names in enumerate(groups.values()):
        owned = [j for j, c in enumerate(names) if owners[c][0] is not None]
        owner = np.array([owners[names[j]][0] for j in owned], dtype=np.int64)
        recency = np.array([owners[names[j]][1] for j in owned], dtype=bool)[:, None]
        member = np.zeros((len(behaviors), len(owned)))
        member[owner, np.arange(len(owned))] = 1.0
        blocks.append(_Block(tuple(names), np.array(owned, dtype=np.int64), owner, recency, bool(recency.any()),
                             member))
        where.update((c, (b, j)) for j, c in enumerate(names))
    present = [(i, f"{x}_count") for i, x in enumerate(behaviors) if f"{x}_count" in where]
    return _AggregatePlan(tuple(blocks), tuple((c, *where[c]) for c in columns),
                          tuple(c for _, c in present), np.array([i for i, _ in present], dtype=np.int64))


def _blocks(features: FeatureArrays) -> tuple[_AggregatePlan, list[np.ndarray]]:
    """The aggregates' plan and, per block, its columns stacked as [columns, rows]."""
    aggregates = features.aggregates
    plan = _aggregate_plan(tuple(aggregates), tuple(v.dtype for v in aggregates.values()), features.spec.behaviors)
    n = len(features)
    return plan, [np.concatenate([aggregates[c] for c in block.names]).reshape(len(block.names), n)
                  for block in plan.blocks]


def _occluded_copies(features: FeatureArrays, copies: np.ndarray, gone: np.ndarray,
                     blocks: tuple[_AggregatePlan, list[np.ndarray]] | None = None) -> FeatureArrays:
    """Row copies[r] of `features` with the behaviours gone[r] (a [copies, behaviours] mask) removed, as
    remove_behaviors does, for every r at once (`blocks`: _blocks(features), when the caller has it)."""
    spec = features.spec
    behaviors = spec.behaviors
    m = len(copies)
    plan, stacked = blocks or _blocks(features)
    tenure = features.aggregates["tenure_days"][copies]
    outs = []
    for block, values in zip(plan.blocks, stacked, strict=True):
        out = values[:, copies]  # [columns, copies], a new array
        if len(block.owned):
            kept = out[block.owned]
            fill = np.where(block.recency, tenure[None, :], 0) if block.has_recency else 0
            out[block.owned] = np.where(gone[:, block.owner].T, fill, kept)
        outs.append(out)
    aggregates = {c: outs[b][j] for c, b, j in plan.slots}
    if plan.counts:
        counts = np.stack([features.aggregates[c] for c in plan.counts], axis=1).astype(np.int64)[copies]
        events = aggregates["n_events"].astype(np.int64) - (counts * gone[:, plan.counts_at]).sum(axis=1)
    else:
        events = aggregates["n_events"].astype(np.int64)
    aggregates["n_events"] = np.maximum(events, 0).astype(features.aggregates["n_events"].dtype)
    # Tokens: each copy keeps those whose behaviour it keeps (ids 1..k; 0, another behaviour, stays).
    lengths = features.lengths[copies]
    copy_of_token = np.repeat(np.arange(m), lengths)
    first = np.zeros(m, dtype=np.int64)
    np.cumsum(lengths[:-1], out=first[1:])
    tokens = np.arange(int(lengths.sum())) + np.repeat(features.offsets[:-1][copies] - first, lengths)
    token_behavior = features.sequences["seq_behavior"].astype(np.int64)[tokens]
    known = (token_behavior >= 1) & (token_behavior <= len(behaviors))
    keep = np.ones(len(tokens), dtype=bool)
    keep[known] = ~gone[copy_of_token[known], token_behavior[known] - 1]
    offsets = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.bincount(copy_of_token[keep], minlength=m), out=offsets[1:])
    tokens = tokens[keep]
    sequences = {name: values[tokens] for name, values in features.sequences.items()}
    return FeatureArrays(spec, features.user_id[copies], features.cutoff_us[copies], aggregates, offsets, sequences)


def null_players(features: FeatureArrays, blocks: tuple[_AggregatePlan, list[np.ndarray]] | None = None,
                 counts: np.ndarray | None = None) -> np.ndarray:
    """[rows, behaviours]: whether removing the behaviour leaves the row as it is (no event of it, its
    columns already what remove_behaviors writes): such a player changes no coalition's value.
    (`blocks`, `counts`: _blocks(features) and event_counts(features), when the caller has them.)"""
    behaviors = features.spec.behaviors
    null = (event_counts(features) if counts is None else counts) == 0
    plan, stacked = blocks or _blocks(features)
    tenure = features.aggregates["tenure_days"]
    for block, values in zip(plan.blocks, stacked, strict=True):
        if len(block.owned):
            owned = values[block.owned]  # [owned columns, rows]
            written = np.where(block.recency, tenure[None, :], 0) if block.has_recency else 0
            null &= (block.member @ (owned != written)).T == 0  # no owned column differs from it
    token_behavior = features.sequences["seq_behavior"].astype(np.int64)
    rows = np.repeat(np.arange(len(features)), features.lengths)
    known = (token_behavior >= 1) & (token_behavior <= len(behaviors))
    null[rows[known], token_behavior[known] - 1] = False
    return null


def shapley_values(model: Predictor, features: FeatureArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(phi [rows, behaviours], baseline [rows], p_buy [rows], expected_value [rows]): exact Shapley
    values of expected_value over the behaviours as players (2^K coalitions, scored in one
    predict_outputs call), the no-behaviour baseline v({}) and the full prediction v(all).

    A coalition that differs from a smaller one only by null players of a row (null_players) is
    the same feature row: each row is scored once per coalition of its other players (a CDNOW
    customer, purchases only: 2 rows, not 16), and every coalition takes its row's value."""
    return _shapley_values(model, features, event_counts(features))


def _shapley_values(model: Predictor, features: FeatureArrays, counts: np.ndarray,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """shapley_values, with event_counts(features) given."""
    k, n = len(features.spec.behaviors), len(features)
    masks = _coalition_masks(k)
    mask = masks.mask
    blocks = _blocks(features)
    players = (~null_players(features, blocks, counts)).astype(np.int64) @ masks.bits  # [row]: its non-null behaviours
    needed = (mask[:, None] & ~players[None, :]) == 0  # [coalition, row]: keeps only non-null players
    coalition, row = np.nonzero(needed)
    # Scored in a multiple of 16 rows (the last one repeated), as the 2^4 coalitions of every row always
    # were: BLAS kernels compute a remainder of rows in another order, which would make a user's numbers
    # depend (in the last bits) on the other users of the call.
    scored = np.arange(len(row) + (-len(row) % 16))
    scored[len(row):] = len(row) - 1
    p_scored, v_scored = model.predict_outputs(_occluded_copies(features, row[scored],
                                                                masks.removed[coalition[scored]], blocks))
    slot = np.zeros((len(mask), n), dtype=np.int64)
    slot[coalition, row] = np.arange(len(row))
    same = slot[masks.index_of[mask[:, None] & players[None, :]], np.arange(n)[None, :]]  # [coalition, row]
    values = v_scored[same]  # [coalition, row]
    phi = (_shapley_weights(k) @ values).T  # [row, behaviour]
    # A behaviour the user never did is a null player (removing it leaves the row as it is): exactly
    # 0, whatever the float noise of scoring equal rows at other places in the batch.
    phi[counts == 0] = 0.0
    # The first coalition is no behaviour (the baseline), the last every one (the prediction itself).
    return phi, values[0], p_scored[same[-1]], values[-1]


@functools.lru_cache(maxsize=16)
def _purchase_shares(behaviors: tuple[str, ...]) -> np.ndarray:
    """shares_from_phi's answer for a user with no behaviour: the purchase history (else equal)."""
    purchase = np.array([1.0 if b == PURCHASE else 0.0 for b in behaviors])
    if purchase.sum() == 0 and len(behaviors):
        purchase = np.full(len(behaviors), 1.0 / len(behaviors))
    purchase.flags.writeable = False
    return purchase


def shares_from_phi(phi: np.ndarray, behaviors: tuple[str, ...], counts: np.ndarray) -> np.ndarray:
    """Positive Shapley values normalised per row (rows sum to 1). A row that nothing lifts above the
    baseline shares the magnitudes of what moves it below; a row that nothing moves at all shares
    equally among the behaviours the user has (the purchase history when they have none). A
    behaviour the user never did (counts 0) gets 0 in every case."""
    positive = np.clip(phi, 0.0, None)
    magnitude = np.abs(phi)
    has = (counts > 0).astype(np.float64)
    equal = np.where(has.sum(axis=1, keepdims=True) > 0, has, _purchase_shares(tuple(behaviors))[None, :])
    chosen = np.where((positive.sum(axis=1) > 1e-12)[:, None], positive,
                      np.where((magnitude.sum(axis=1) > 1e-12)[:, None], magnitude, equal))
    return chosen / chosen.sum(axis=1, keepdims=True)


def predict_with_shares(model: Predictor, features: FeatureArrays) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p_buy, expected_value, shares [rows, behaviours]) in one predict_outputs call."""
    counts = event_counts(features)
    has = counts > 0
    if len(features) and (has.sum(axis=1) <= 1).all():
        # No row has two behaviours, so every share is known without the coalitions: shares_from_phi
        # gives the one behaviour a row has all of it, whatever its phi, and a row with none the
        # purchase shares. Only the prediction itself is scored (CDNOW's buyers: half the rows, and none
        # of the occluded copies), in a multiple of 16 rows as _shapley_values scores, so its numbers are
        # the coalition path's to the bit.
        n = len(features)
        scored = np.minimum(np.arange(n + (-n % 16)), n - 1)
        p_buy, value = model.predict_outputs(features.take(scored))
        shares = np.where(has.any(axis=1)[:, None], has.astype(np.float64),
                          _purchase_shares(tuple(features.spec.behaviors))[None, :])
        return p_buy[:n], value[:n], shares
    phi, _baseline, p_buy, value = _shapley_values(model, features, counts)
    return p_buy, value, shares_from_phi(phi, features.spec.behaviors, counts)


# -- effect: one more event at the cutoff -------------------------------------------------------
def effect_behaviors(spec: FeatureSpec) -> tuple[str, ...]:
    """The behaviours an event can be inserted of: every one but the purchase."""
    return tuple(b for b in spec.behaviors if b != PURCHASE)


def per_user_effects(model: Predictor, features: FeatureArrays) -> tuple[np.ndarray, np.ndarray]:
    """(d expected_value, d p_buy), each [rows, effect_behaviors]: per row, the change when one more
    event of each behaviour is inserted at the cutoff (one predict_outputs call)."""
    behaviors = effect_behaviors(features.spec)
    n = len(features)
    parts = [features, *(insert_event(features, b) for b in behaviors)]
    p_buy, value = model.predict_outputs(FeatureArrays.concat(parts))
    d_value = np.column_stack([value[(j + 1) * n:(j + 2) * n] - value[:n] for j in range(len(behaviors))]) \
        if behaviors else np.zeros((n, 0))
    d_p = np.column_stack([p_buy[(j + 1) * n:(j + 2) * n] - p_buy[:n] for j in range(len(behaviors))]) \
        if behaviors else np.zeros((n, 0))
    return d_value, d_p


def user_effects(model: Predictor, features: FeatureArrays) -> list[dict[str, dict[str, float] | None]]:
    """Per row, what `"explain": "effect"` answers: for each non-purchase behaviour, the change in
    expected_value and p_buy one more event of it at the cutoff makes (per_user_effects), or None
    for a behaviour the model never saw in training (the `seen` of the tables saved with it, as
    influence.json's effect; a model without tables: every behaviour of its spec is computed; one
    that reads only purchases, behavior_aware False: None for all, and no model call)."""
    behaviors = effect_behaviors(features.spec)
    tables = getattr(model, "influence_tables", None)
    seen = {b: True for b in behaviors} if tables is None or not tables.seen else tables.seen
    columns = [(j, b) for j, b in enumerate(behaviors) if seen.get(b, False)]
    out: list[dict[str, dict[str, float] | None]] = [{b: None for b in behaviors} for _ in range(len(features))]
    if not getattr(model, "behavior_aware", True) or not columns:
        return out
    d_value, d_p = per_user_effects(model, features)
    values, probabilities = d_value.tolist(), d_p.tolist()
    for row, value, p in zip(out, values, probabilities, strict=True):
        for j, b in columns:
            row[b] = {"expected_value": value[j], "p_buy": p[j]}
    return out


def _mean_ci(x: np.ndarray) -> dict[str, float]:
    mean = float(np.mean(x))
    half = float(Z_95 * np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {"mean": mean, "low": mean - half, "high": mean + half}


@dataclass(frozen=True)
class InfluenceTables:
    """What influence.json holds: the effect and share tables and how they were computed."""

    effect: dict[str, dict[str, float] | None]  # behaviour -> {mean, low, high} of d expected_value; None: unseen
    effect_p_buy: dict[str, dict[str, float] | None]
    share: dict[str, float]  # mean per-user share, sums to 1
    users: int
    seen: dict[str, bool]

    def to_dict(self) -> dict[str, Any]:
        return {
            "effect": self.effect,
            "effect_p_buy": self.effect_p_buy,
            "share": self.share,
            "users": self.users,
            "seen": self.seen,
            "method": {
                "effect": f"{EFFECT_METHOD}: mean over users of the change in expected_value (p_buy) when one "
                          f"event is inserted {INSERT_BEFORE_SECONDS:g} s before the cutoff; 95% normal interval",
                "share": f"{METHOD}: exact Shapley values of expected_value over behaviour groups (occlusion of "
                         "a behaviour's columns and tokens), positive values normalised per user, averaged",
            },
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> InfluenceTables:
        return cls(dict(raw["effect"]), dict(raw.get("effect_p_buy") or {}), dict(raw["share"]),
                   int(raw.get("users", 0)), dict(raw.get("seen") or {}))


def seen_behaviors(frame: pd.DataFrame | FeatureArrays, behaviors: tuple[str, ...]) -> dict[str, bool]:
    """Whether each behaviour occurs in the (training) rows: a model reports no effect for one it never saw."""
    def total(b: str) -> float:
        column = f"{b}_count"
        if isinstance(frame, FeatureArrays):
            return float(np.sum(frame.aggregates[column])) if column in frame.aggregates else 0.0
        return float(frame[column].sum()) if column in frame.columns else 0.0
    return {b: total(b) > 0 for b in behaviors}


def influence_tables(model: Predictor, features: FeatureArrays, seen: Mapping[str, bool],
                     chunk_rows: int = 1024) -> InfluenceTables:
    """Both tables on a sample of users' feature rows (`features`); `seen`: the behaviours present
    in the model's training rows (the others get effect None, not a tiny number)."""
    behaviors = features.spec.behaviors
    movers = effect_behaviors(features.spec)
    if len(features) == 0:
        raise ValueError("influence tables need at least one user")
    d_values, d_ps, phis = [], [], []
    for start in range(0, len(features), chunk_rows):
        part = features.take(np.arange(start, min(start + chunk_rows, len(features))))
        d_value, d_p = per_user_effects(model, part)
        phi, _baseline, _p, _v = shapley_values(model, part)
        d_values.append(d_value)
        d_ps.append(d_p)
        phis.append(shares_from_phi(phi, behaviors, event_counts(part)))
    d_value, d_p = np.concatenate(d_values), np.concatenate(d_ps)
    shares = np.concatenate(phis).mean(axis=0)
    shares = shares / shares.sum()
    return InfluenceTables(
        effect={b: _mean_ci(d_value[:, j]) if seen.get(b, False) else None for j, b in enumerate(movers)},
        effect_p_buy={b: _mean_ci(d_p[:, j]) if seen.get(b, False) else None for j, b in enumerate(movers)},
        share={b: float(s) for b, s in zip(behaviors, shares, strict=True)},
        users=len(features),
        seen={b: bool(seen.get(b, False)) for b in behaviors},
    )


def sample_rows(n: int, max_rows: int, seed: int) -> np.ndarray:
    """At most `max_rows` row positions of `n`, sorted, drawn with `seed`."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


# -- the planted truth --------------------------------------------------------------------------
def planted_truth(influence: Mapping[str, float], behavior_mix: Mapping[str, float],
                  behaviors: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """The synthetic generator's truth in the tables' terms: `effect[b]` is the planted purchases
    one event of `b` causes (P(purchase | one event)); `share[b]` the share of all purchases caused
    by `b`'s events, mix_b * influence_b / sum (the purchase history causes none)."""
    caused = {b: float(behavior_mix.get(b, 0.0)) * float(influence.get(b, 0.0)) for b in behaviors}
    total = sum(caused.values()) or 1.0
    return {
        "effect": {b: (float(influence[b]) if b in influence else None) for b in behaviors if b != PURCHASE},
        "share": {b: caused[b] / total for b in behaviors},
    }


def effect_order(effect: Mapping[str, Mapping[str, float] | float | None]) -> list[str]:
    """Behaviours with an effect, strongest first."""
    def value(v: Mapping[str, float] | float) -> float:
        return float(v["mean"]) if isinstance(v, Mapping) else float(v)
    present = {b: value(v) for b, v in effect.items() if v is not None}
    return sorted(present, key=lambda b: -present[b])
