"""The online store's per-user state: one compact binary record per user (layout: docs/online.md),
encoded for many users at once and decoded into one EventColumns with a few vectorised gathers."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np
import pandas as pd

from uservalue.features.online import EventColumns

# 2: the stored hashes are features.buckets' md5-based id_hash (1 held DuckDB's hash()): a store written
# by an older version is refused, not read with buckets that no longer match the model's.
FORMAT_VERSION = 2
MAGIC = b"UV"
HEADER = struct.Struct("<2sBBIIIII8x")
RECORD = np.dtype([("t", "<f8"), ("amount", "<f8"), ("behavior", "u1"), ("item", "<u4"), ("category", "<u4")])
NULL_INDEX = np.uint32(0xFFFFFFFF)
TEXT_OFFSETS, IDS_OFFSETS = 1, 2


class StoreFormatError(ValueError):
    """A stored blob is not per-user state of a format this code reads."""


def _pack_text(values: Sequence[str], may_hold_nul: bool = True) -> tuple[bytes, bool]:
    """(encoded values, whether offsets were needed because a value holds a NUL)."""
    if not values:
        return b"", False
    if not may_hold_nul or not any("\x00" in v for v in values):
        return "\x00".join(values).encode(), False
    parts = [v.encode() for v in values]
    offsets = np.zeros(len(parts) + 1, dtype="<u4")
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    return offsets.tobytes() + b"".join(parts), True


def _unpack_text(blob: bytes, start: int, size: int, count: int, offsets: bool) -> list[str]:
    if count == 0:
        return []
    if not offsets:
        return blob[start:start + size].decode().split("\x00")
    bounds = np.frombuffer(blob, "<u4", count + 1, start).tolist()
    body = start + 4 * (count + 1)
    return [blob[body + a:body + b].decode() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _blob(n_events: int, hashes: bytes, records: bytes | memoryview, values: Sequence[str], ids: Sequence[str],
          may_hold_nul: bool) -> bytes:
    text, text_offsets = _pack_text(values, may_hold_nul)
    id_text, id_offsets = _pack_text(ids)
    flags = (TEXT_OFFSETS if text_offsets else 0) | (IDS_OFFSETS if id_offsets else 0)
    header = HEADER.pack(MAGIC, FORMAT_VERSION, flags, n_events, len(values), len(text), len(ids), len(id_text))
    return b"".join((header, hashes, records, text, id_text))


class _Tables(NamedTuple):
    """Each user's distinct values, in order of first appearance."""

    local: np.ndarray  # per value: its index in its user's table; NULL_INDEX for None
    bounds: np.ndarray  # user u's entries are [bounds[u], bounds[u + 1])
    entries: np.ndarray  # per entry: its code in `uniques`
    uniques: np.ndarray  # object

    def values(self) -> list[str]:
        """Every user's entries, concatenated (slice with `bounds`)."""
        return self.uniques[self.entries].tolist()


def _tables(owner: np.ndarray, values: np.ndarray, n_users: int) -> tuple[_Tables, np.ndarray]:
    """The per-user tables of `values` (grouped by `owner`, a user code), and each value's global code.
    Two hash factorizations, no sort: the (user, value) pairs appear grouped by user."""
    code, uniques = pd.factorize(values, sort=False)
    present = code >= 0
    own = owner[present]
    pair_code, pairs = pd.factorize((own << 32) | code[present], sort=False)
    bounds = np.searchsorted(pairs >> 32, np.arange(n_users + 1))
    local = np.full(len(values), NULL_INDEX, dtype=np.int64)
    local[present] = pair_code - bounds[own]
    return _Tables(local, bounds, pairs & 0xFFFFFFFF, np.asarray(uniques, dtype=object)), code


def encode_users(events: EventColumns, event_ids: Sequence[str | None] | None = None,
                 known_ids: Mapping[str, Iterable[str]] | None = None) -> tuple[list[str], list[bytes]]:
    """Per-user state of every user in `events`: (user ids in order of first appearance, blobs).

    A user's events keep their order. `event_ids` (aligned with the events, None for none) and
    `known_ids` (per user) are the event ids the blob remembers as seen."""
    codes, users = pd.factorize(events.user_id, sort=False)
    if len(codes) and (np.diff(codes) < 0).any():  # group each user's events, keeping their order
        order = np.argsort(codes, kind="stable")
        events, codes = events.take(order), codes[order]
        event_ids = None if event_ids is None else np.asarray(event_ids, dtype=object)[order]
    n, n_users = len(codes), len(users)
    codes = codes.astype(np.int64)
    bounds = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(codes, minlength=n_users), out=bounds[1:])

    # A user's table: its distinct behaviours (index < 256), then its distinct item and category ids.
    behaviors, _ = _tables(codes, events.behavior, n_users)
    if n and behaviors.local.max() > 255:
        raise ValueError("a user has more than 256 distinct behaviours")
    ids_interleaved = np.empty(2 * n, dtype=object)
    ids_interleaved[0::2], ids_interleaved[1::2] = events.item_id, events.category_id
    ids, code = _tables(np.repeat(codes, 2), ids_interleaved, n_users)
    hash_of = np.zeros(len(ids.uniques), dtype=np.uint64)
    interleaved_hash = np.empty(2 * n, dtype=np.uint64)
    interleaved_hash[0::2], interleaved_hash[1::2] = events.item_hash, events.category_hash
    hash_of[code[code >= 0]] = interleaved_hash[code >= 0]
    entry_hash = hash_of[ids.entries].astype("<u8")
    n_behaviors = np.diff(behaviors.bounds)
    shifted = np.where(ids.local == NULL_INDEX, NULL_INDEX, ids.local + np.repeat(n_behaviors[codes], 2))
    behavior_values, id_values = behaviors.values(), ids.values()
    may_hold_nul = "\x00" in "".join(behaviors.uniques.tolist()) or "\x00" in "".join(ids.uniques.tolist())

    records = np.empty(n, dtype=RECORD)
    records["t"], records["amount"], records["behavior"] = events.t, events.amount, behaviors.local
    records["item"], records["category"] = shifted[0::2], shifted[1::2]
    record_bytes = memoryview(records.tobytes())
    seen = _ids_per_user(codes, n_users, event_ids, users, known_ids)
    size = RECORD.itemsize
    blobs = []
    for u in range(n_users):
        a, b = bounds[u], bounds[u + 1]
        ba, bb, va, vb = behaviors.bounds[u], behaviors.bounds[u + 1], ids.bounds[u], ids.bounds[u + 1]
        blobs.append(_blob(int(b - a), bytes(8 * int(bb - ba)) + entry_hash[va:vb].tobytes(),
                           record_bytes[a * size:b * size], behavior_values[ba:bb] + id_values[va:vb], seen[u],
                           may_hold_nul))
    return users.tolist(), blobs


def _ids_per_user(codes: np.ndarray, n_users: int, event_ids: Sequence[str | None] | None, users: np.ndarray,
                  known_ids: Mapping[str, Iterable[str]] | None) -> list[list[str]]:
    seen: list[list[str]] = [[] for _ in range(n_users)]
    if event_ids is not None:
        ids = np.asarray(event_ids, dtype=object)
        has = np.flatnonzero(~pd.isna(ids))
        for u, event_id in zip(codes[has].tolist(), ids[has].tolist(), strict=True):
            seen[u].append(event_id)
    if known_ids:
        for u, user in enumerate(users.tolist()):
            seen[u].extend(known_ids.get(user, ()))
    return [sorted(set(s)) if s else s for s in seen]


class _Parsed(NamedTuple):
    """Where the sections of one blob lie."""

    n_events: int
    n_values: int
    hashes_at: int
    records_at: int
    text_at: int
    text_bytes: int
    flags: int
    n_ids: int
    ids_bytes: int

    def values(self, blob: bytes) -> list[str]:
        return _unpack_text(blob, self.text_at, self.text_bytes, self.n_values, bool(self.flags & TEXT_OFFSETS))

    def ids(self, blob: bytes) -> list[str]:
        return _unpack_text(blob, self.text_at + self.text_bytes, self.ids_bytes, self.n_ids,
                            bool(self.flags & IDS_OFFSETS))


def _parse(blob: bytes) -> _Parsed:
    if len(blob) < HEADER.size:
        raise StoreFormatError(f"per-user state of {len(blob)} bytes is shorter than its header")
    magic, version, flags, n, n_values, text_bytes, n_ids, ids_bytes = HEADER.unpack_from(blob)
    if magic != MAGIC or version != FORMAT_VERSION:
        raise StoreFormatError(f"per-user state of format {magic!r} v{version}; this code reads {MAGIC!r} v{FORMAT_VERSION}")
    records_at = HEADER.size + 8 * n_values
    text_at = records_at + RECORD.itemsize * n
    if len(blob) < text_at + text_bytes + ids_bytes:
        raise StoreFormatError(f"per-user state of {len(blob)} bytes is shorter than its header says")
    return _Parsed(n, n_values, HEADER.size, records_at, text_at, text_bytes, flags, n_ids, ids_bytes)


def decode_users(user_ids: Sequence[str], blobs: Sequence[bytes]) -> EventColumns:
    """The events of every user (blobs aligned with user_ids), concatenated in that order."""
    parsed = [_parse(b) for b in blobs]
    counts = [p.n_events for p in parsed]
    if len(parsed) == 1:  # the common case: views into the one blob
        p, blob = parsed[0], blobs[0]
        hashes = np.frombuffer(blob, "<u8", p.n_values, p.hashes_at)
        records = np.frombuffer(blob, RECORD, p.n_events, p.records_at)
        values, base = p.values(blob), 0
    else:  # the sections of every blob joined (bytes), then read once
        pairs = list(zip(parsed, blobs, strict=True))
        hashes = np.frombuffer(b"".join([b[p.hashes_at:p.records_at] for p, b in pairs]), "<u8")
        records = np.frombuffer(b"".join([b[p.records_at:p.text_at] for p, b in pairs]), RECORD)
        if any(p.flags & TEXT_OFFSETS for p in parsed):
            values = list(chain.from_iterable(p.values(b) for p, b in pairs))
        else:  # every user's values in one decode and split
            texts = [b[p.text_at:p.text_at + p.text_bytes] for p, b in pairs if p.n_values]
            values = b"\x00".join(texts).decode().split("\x00") if texts else []
        sizes = np.array([p.n_values for p in parsed], dtype=np.int64)
        base = np.repeat(np.cumsum(sizes) - sizes, counts)
    null = len(values)  # the extra last slot: None, hash 0
    table = np.empty(null + 1, dtype=object)
    table[:null] = values
    table_hash = np.zeros(null + 1, dtype=np.uint64)
    table_hash[:null] = hashes

    def lookup(index: np.ndarray) -> np.ndarray:  # the null index (0xFFFFFFFF) lands on the last slot
        return np.minimum(index.astype(np.int64) + base, null)

    item, category = lookup(records["item"]), lookup(records["category"])
    if len(parsed) == 1:
        user_column = np.full(counts[0], user_ids[0], dtype=object)
    else:
        users = np.empty(len(user_ids), dtype=object)
        users[:] = list(user_ids)
        user_column = np.repeat(users, counts)
    return EventColumns(
        user_id=user_column,
        t=records["t"].astype(np.float64),
        behavior=table[records["behavior"] + base],
        item_id=table[item],
        category_id=table[category],
        amount=records["amount"].astype(np.float64),
        item_hash=table_hash[item],
        category_hash=table_hash[category],
    )


def decode_ids(blob: bytes) -> list[str]:
    """The event ids a user's state remembers as seen."""
    return _parse(blob).ids(blob)


