"""The baselines: recent popularity, and item-to-item co-occurrence (cosine over users, top neighbours kept)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from uservalue.recs.base import FitOptions, Histories, Recommender


class Popularity(Recommender):
    """Every user gets the items with the most events in the last `window_days` before the cutoff."""

    kind = "popularity"

    def __init__(self, window_days: float = 30.0, **params: object) -> None:
        super().__init__(window_days=window_days, **params)
        self.recent = np.zeros(0, dtype=np.float32)

    def _fit(self, histories: Histories, cutoff: dt.datetime, options: FitOptions) -> dict[str, float]:
        since = cutoff.timestamp() - float(self.params["window_days"]) * 86_400
        recent = (histories.t >= since) & (histories.item >= 0)
        counts = np.bincount(histories.item[recent], minlength=len(self.catalog)).astype(np.float32)
        self.recent = counts / max(float(counts.max()), 1.0)
        return {"recent_events": float(recent.sum())}

    def _score(self, histories: Histories, users: np.ndarray) -> np.ndarray:
        return np.tile(self.recent, (len(users), 1))

    def _save_state(self, path: Path) -> None:
        np.save(path / "recent.npy", self.recent, allow_pickle=False)

    def _load_state(self, path: Path) -> None:
        self.recent = np.load(path / "recent.npy", allow_pickle=False)


def user_item_matrix(histories: Histories, users: np.ndarray, n_items: int, last: int) -> sp.csr_matrix:
    """Binary users x items: each user's last `last` distinct known items."""
    rows, cols = [], []
    for row, user in enumerate(users):
        items = histories.item[histories.user_slice(int(user))][::-1]
        items = items[items >= 0]
        _, first = np.unique(items, return_index=True)
        chosen = items[np.sort(first)][:last]
        rows.append(np.full(len(chosen), row))
        cols.append(chosen)
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    return sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(len(users), n_items))


class ItemCooccurrence(Recommender):
    """Item-to-item: cosine similarity of items over the users who had both (each user's last `history`
    distinct items), the `neighbors` most similar kept per item; a user scores an item by its summed
    similarity to the user's last `history` distinct items (an item seen scores its own similarity, 1)."""

    kind = "cooccurrence"

    def __init__(self, neighbors: int = 100, history: int = 50, chunk_items: int = 2048, **params: object) -> None:
        super().__init__(neighbors=neighbors, history=history, chunk_items=chunk_items, **params)
        self.similar = sp.csr_matrix((0, 0), dtype=np.float32)

    def _fit(self, histories: Histories, cutoff: dt.datetime, options: FitOptions) -> dict[str, float]:
        self.similar = similarity(histories, len(self.catalog), int(self.params["neighbors"]),
                                  int(self.params["history"]), int(self.params["chunk_items"]))
        return {"similar_pairs": float(self.similar.nnz)}

    def _score(self, histories: Histories, users: np.ndarray) -> np.ndarray:
        x = user_item_matrix(histories, users, len(self.catalog), int(self.params["history"]))
        return np.asarray((x @ self.similar).todense(), dtype=np.float32)

    def _save_state(self, path: Path) -> None:
        sp.save_npz(path / "similar.npz", self.similar)

    def _load_state(self, path: Path) -> None:
        self.similar = sp.load_npz(path / "similar.npz").tocsr()


def similarity(histories: Histories, n_items: int, neighbors: int, history: int, chunk_items: int = 2048) -> sp.csr_matrix:
    """Items x items cosine similarity over users (each user's last `history` distinct items), the
    `neighbors` largest kept per row."""
    x = user_item_matrix(histories, np.arange(len(histories.users)), n_items, history)
    xt = x.T.tocsr()
    norm = np.sqrt(np.asarray(x.sum(axis=0)).ravel()).astype(np.float32)
    norm[norm == 0] = 1.0
    parts = []
    for start in range(0, n_items, chunk_items):
        block = (xt[start:start + chunk_items] @ x).tocsr()  # items in the chunk x all items: users in common
        block = sp.diags(1 / norm[start:start + chunk_items]) @ block @ sp.diags(1 / norm)
        parts.append(_top_per_row(block.tocsr(), neighbors))
    return sp.vstack(parts).tocsr().astype(np.float32) if parts else sp.csr_matrix((n_items, n_items), dtype=np.float32)


def _top_per_row(matrix: sp.csr_matrix, keep: int) -> sp.csr_matrix:
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
    rows, cols, vals = [], [], []
    for row in range(matrix.shape[0]):
        lo, hi = indptr[row], indptr[row + 1]
        if hi - lo > keep:
            pick = lo + np.argpartition(-data[lo:hi], keep - 1)[:keep]
        else:
            pick = np.arange(lo, hi)
        rows.append(np.full(len(pick), row))
        cols.append(indices[pick])
        vals.append(data[pick])
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=matrix.shape)
