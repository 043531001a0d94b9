"""The graph recommender ("graph"): LightGCN-style propagation over the user-item bipartite graph of the
events before the cutoff, scored by user . item.

A user-item edge weighs the user's events on the item, each by its behaviour (`behavior_weights`: view,
fav, cart, buy) and halved every `half_life_days` before the cutoff. The graph is normalised as LightGCN
does, P = D_u^-1/2 A D_i^-1/2, and an item's embedding is the mean of its trained embedding and its
`hops` two-hop propagations through the users (item -> user -> item, Pᵀ P). There are no free user
embeddings: a user is one propagation step from the items, the edge-weighted mean of the propagated
embeddings of the items they had, so a user unseen in training (at serving time, from the request's or the
store's events) is embedded the same way as a training user.

Trained with BPR on the task the evaluation sets: each training user's latest `holdout` share of events are
the targets (repeats of their earlier items included), the user embedded from the events before them; a
target item of a user drawn uniformly is ranked against a uniformly drawn item, by user . item + bias + a
learned weight on log(1 + the user's own edge weight on the item) (repeat interest), with L2 on the
embeddings of the batch. Every step propagates the whole graph (plain sparse matmuls: scipy CSR on the CPU,
torch CSR on CUDA, the dot products under bf16 autocast); `threads` > 0 sets torch's threads while fitting.
Scoring is numpy only: the propagated item embeddings and biases are saved."""

from __future__ import annotations

import datetime as dt
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from uservalue.models.deep.runtime import resolve_device, seed_everything, training_autocast
from uservalue.recs.base import FitOptions, Histories, Recommender
from uservalue.schema import DEFAULT_BEHAVIORS

DEFAULT_BEHAVIOR_WEIGHTS = {"view": 1.0, "fav": 2.0, "cart": 3.0, "buy": 4.0}


def edge_matrix(histories: Histories, users: np.ndarray, n_items: int, weights: dict[str, float],
                half_life_days: float | None, reference_time: float | None,
                keep: np.ndarray | None = None) -> sp.csr_matrix:
    """(len(users), n_items) summed edge weights: behaviour weight x recency (halved every half_life_days
    before the later of `reference_time` and the user's last event); only the events where `keep` (a mask
    over all of histories' rows), when given."""
    behavior_weight = np.array([float(weights.get(b, 1.0)) for b in DEFAULT_BEHAVIORS] + [1.0])
    rows, cols, vals = [], [], []
    for row, user in enumerate(users):
        span = histories.user_slice(int(user))
        item = histories.item[span]
        known = (item >= 0) if keep is None else (item >= 0) & keep[span]
        w = behavior_weight[histories.behavior[span][known]]  # index -1 (another behaviour): weight 1
        if half_life_days and known.any():
            t = histories.t[span]
            last = float(t[known].max())
            now = last if reference_time is None else max(reference_time, last)
            w = w * np.power(0.5, np.maximum(now - t[known], 0) / 86_400 / float(half_life_days))
        rows.append(np.full(int(known.sum()), row))
        cols.append(item[known])
        vals.append(w)
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    v = np.concatenate(vals) if vals else np.zeros(0)
    matrix = sp.csr_matrix((v, (r, c)), shape=(len(users), n_items), dtype=np.float64)
    matrix.sum_duplicates()
    return matrix


def holdout_split(histories: Histories, share: float, n_items: int) -> tuple[np.ndarray, sp.csr_matrix]:
    """(a mask over histories' rows: the events that embed each user, users x catalogue binary targets: the
    items of each user's latest `share` of known-item events, at least one, when the user has two or more)."""
    history = np.zeros(len(histories.item), bool)
    rows, cols = [], []
    for user in range(len(histories.users)):
        span = histories.user_slice(user)
        known = np.flatnonzero(histories.item[span] >= 0) + span.start
        if len(known) < 2:
            history[known] = True
            continue
        split = len(known) - max(1, round(share * len(known)))
        history[known[:split]] = True
        items = np.unique(histories.item[known[split:]])
        rows.append(np.full(len(items), user))
        cols.append(items)
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    targets = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)),
                            shape=(len(histories.users), n_items))
    return history, targets


def _row_mean(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Each row divided by its sum (a user: the edge-weighted mean of their items)."""
    out = matrix.astype(np.float32)
    sums = np.asarray(matrix.sum(axis=1)).ravel()
    out.data = (matrix.data / np.repeat(np.maximum(sums, 1e-12), np.diff(matrix.indptr))).astype(np.float32)
    return out


class _Sparse:
    """A constant sparse matrix and its transpose on the training device: scipy CSR on the CPU (faster there
    than torch's sparse kernels), torch CSR on CUDA."""

    def __init__(self, matrix: sp.csr_matrix, device: torch.device) -> None:
        self.device = device
        matrix = matrix.astype(np.float32).tocsr()
        if device.type == "cpu":
            self.forward, self.transposed = matrix, matrix.T.tocsr()
        else:
            self.forward, self.transposed = _torch_csr(matrix, device), _torch_csr(matrix.T.tocsr(), device)

    def apply(self, dense: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        matrix = self.transposed if transposed else self.forward
        if isinstance(matrix, sp.spmatrix):
            return torch.from_numpy(np.asarray(matrix @ dense.detach().float().numpy(), dtype=np.float32))
        with torch.autocast(device_type=self.device.type, enabled=False):  # sparse kernels in float32
            return matrix @ dense.float()


def _torch_csr(matrix: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is not
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.from_numpy(matrix.indptr.astype(np.int64)),
                                       torch.from_numpy(matrix.indices.astype(np.int64)),
                                       torch.from_numpy(matrix.data), matrix.shape, device=device)


class _SpMM(torch.autograd.Function):
    """operator @ dense, differentiable in `dense` (the operator is a constant)."""

    @staticmethod
    def forward(ctx: Any, dense: torch.Tensor, operator: _Sparse, transposed: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.operator, ctx.transposed = operator, transposed
        return operator.apply(dense, transposed)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return ctx.operator.apply(grad.contiguous(), not ctx.transposed), None, None


def propagate(embedding: torch.Tensor, graph: _Sparse, hops: int) -> torch.Tensor:
    """The mean of the item embeddings and their `hops` two-hop propagations (Pᵀ P)^h E."""
    total, x = embedding, embedding
    for _ in range(hops):
        x = _SpMM.apply(_SpMM.apply(x, graph, False), graph, True)
        total = total + x
    return total / (hops + 1)


class GraphRecommender(Recommender):
    kind = "graph"

    def __init__(self, dim: int = 64, hops: int = 1, epochs: int = 40, samples_per_user: int = 10,
                 batch_size: int = 8192, learning_rate: float = 0.01, l2: float = 0.01,
                 behavior_weights: dict[str, float] | None = None, half_life_days: float | None = 60.0,
                 item_bias: bool = True, holdout: float = 0.5, threads: int = 0, **params: object) -> None:
        if not 0 < holdout < 1:
            raise ValueError(f"graph: holdout ({holdout}) in (0, 1) expected: the share of each user's latest events "
                             "that are the training targets")
        if dim < 1 or hops < 0 or epochs < 0 or samples_per_user < 1 or batch_size < 1:
            raise ValueError(f"graph: dim ({dim}), samples_per_user ({samples_per_user}), batch_size ({batch_size}) "
                             f">= 1 and hops ({hops}), epochs ({epochs}) >= 0 expected")
        weights = {**DEFAULT_BEHAVIOR_WEIGHTS, **(behavior_weights or {})}
        super().__init__(dim=dim, hops=hops, epochs=epochs, samples_per_user=samples_per_user, batch_size=batch_size,
                         learning_rate=learning_rate, l2=l2, behavior_weights=weights, half_life_days=half_life_days,
                         item_bias=item_bias, holdout=holdout, threads=threads, **params)
        self.item_embedding = np.zeros((0, dim), np.float32)  # propagated (what users and scores read)
        self.item_bias = np.zeros(0, np.float32)
        self.repeat = 0.0  # weight of log(1 + the user's own weight on the item)
        self.reference_time: float | None = None

    def _edges(self, histories: Histories, users: np.ndarray) -> sp.csr_matrix:
        return edge_matrix(histories, users, len(self.catalog), self.params["behavior_weights"],
                           self.params.get("half_life_days"), self.reference_time)

    # -- fit ---------------------------------------------------------------------------------
    def _fit(self, histories: Histories, cutoff: dt.datetime, options: FitOptions) -> dict[str, float]:
        previous = torch.get_num_threads()
        if int(self.params["threads"]) > 0:  # on busy shared cores one thread can be many times faster than two
            torch.set_num_threads(int(self.params["threads"]))
        try:
            return self._train(histories, cutoff, options)
        finally:
            torch.set_num_threads(previous)

    def _train(self, histories: Histories, cutoff: dt.datetime, options: FitOptions) -> dict[str, float]:
        seed_everything(options.seed)
        device = resolve_device(options.device)
        rng = np.random.default_rng(options.seed)
        self.reference_time = cutoff.timestamp()
        p = self.params
        n_items, dim, hops = len(self.catalog), int(p["dim"]), int(p["hops"])
        a = self._edges(histories, np.arange(len(histories.users)))  # users x items
        user_degree = np.asarray(a.sum(axis=1)).ravel()
        item_degree = np.asarray(a.sum(axis=0)).ravel()
        normalised = sp.diags(1 / np.sqrt(np.maximum(user_degree, 1e-12))) @ a \
            @ sp.diags(1 / np.sqrt(np.maximum(item_degree, 1e-12)))
        graph = _Sparse(normalised.tocsr(), device)
        # The training examples: each user's latest `holdout` share of events are the targets (the items to
        # rank high, repeats included), the user embedded from the events before them, as in the evaluation.
        history, targets = holdout_split(histories, float(p["holdout"]), n_items)
        h = edge_matrix(histories, np.arange(len(histories.users)), n_items, p["behavior_weights"],
                        p.get("half_life_days"), None, keep=history)
        mean_rows = _row_mean(h)
        seen = h.copy()
        seen.data = np.log1p(seen.data)  # the repeat feature: log(1 + the user's weight on the item)
        eligible = np.flatnonzero((np.diff(h.indptr) > 0) & (np.diff(targets.indptr) > 0))
        n_targets = np.diff(targets.indptr)
        embedding = torch.nn.Parameter(torch.randn(n_items, dim, device=device) * 0.1)
        bias = torch.nn.Parameter(torch.zeros(n_items, device=device), requires_grad=bool(p["item_bias"]))
        repeat = torch.nn.Parameter(torch.ones((), device=device))
        learned = [embedding, repeat] + ([bias] if p["item_bias"] else [])
        optimizer = torch.optim.Adam(learned, lr=float(p["learning_rate"]))
        batch, l2 = int(p["batch_size"]), float(p["l2"])
        loss, seconds = float("nan"), []
        for epoch in range(int(p["epochs"]) if len(eligible) else 0):
            started = time.perf_counter()
            users = np.repeat(rng.permutation(eligible), int(p["samples_per_user"]))
            users = users[rng.permutation(len(users))]
            total = 0.0
            for start in range(0, len(users), batch):
                u = users[start:start + batch]
                slot = targets.indptr[u] + (rng.random(len(u)) * n_targets[u]).astype(np.int64)
                positive, negative = targets.indices[slot], rng.integers(0, n_items, len(u))
                repeats = torch.from_numpy(np.asarray(seen[u, positive] - seen[u, negative], np.float32).ravel())
                batch_rows, inverse = np.unique(u, return_inverse=True)
                rows = _Sparse(mean_rows[batch_rows], device)
                with training_autocast(device):
                    items = propagate(embedding, graph, hops)
                    pos_t = torch.from_numpy(positive).to(device)
                    neg_t = torch.from_numpy(negative).to(device)
                    user = _SpMM.apply(items, rows, False)[torch.from_numpy(inverse).to(device)]
                    margin = (user * (items[pos_t] - items[neg_t])).sum(1) + bias[pos_t] - bias[neg_t] \
                        + repeat * repeats.to(device)
                    reg = embedding[pos_t].pow(2).sum(1) + embedding[neg_t].pow(2).sum(1)
                    batch_loss = -torch.nn.functional.logsigmoid(margin.float()).mean() + l2 * reg.float().mean()
                optimizer.zero_grad(set_to_none=True)
                batch_loss.backward()
                optimizer.step()
                total += float(batch_loss.detach()) * len(u)
            loss = total / max(len(users), 1)
            seconds.append(time.perf_counter() - started)
            if options.log_metrics is not None:
                options.log_metrics({"recs_graph_loss": loss, "recs_graph_epoch_seconds": seconds[-1]}, epoch)
        with torch.no_grad():
            self.item_embedding = propagate(embedding.detach().float(), graph, hops).cpu().numpy().astype(np.float32)
        self.item_bias = bias.detach().float().cpu().numpy().astype(np.float32)
        self.repeat = float(repeat.detach().float().cpu())
        return {"edges": float(a.nnz), "train_users": float(len(eligible)), "final_loss": loss, "repeat": self.repeat,
                "seconds_per_epoch": float(np.mean(seconds)) if seconds else 0.0}

    # -- score -------------------------------------------------------------------------------
    def _score(self, histories: Histories, users: np.ndarray) -> np.ndarray:
        a = self._edges(histories, users)
        user = np.asarray(_row_mean(a) @ self.item_embedding, dtype=np.float32)
        a.data = np.log1p(a.data)
        # a user without known items: the biases alone
        return user @ self.item_embedding.T + self.item_bias + self.repeat * a.toarray().astype(np.float32)

    # -- save / load -------------------------------------------------------------------------
    def _save_state(self, path: Path) -> None:
        np.save(path / "item_embedding.npy", self.item_embedding, allow_pickle=False)
        np.save(path / "item_bias.npy", self.item_bias, allow_pickle=False)
        np.save(path / "repeat.npy", np.array([self.repeat], np.float32), allow_pickle=False)
        np.save(path / "reference_time.npy", np.array([np.nan if self.reference_time is None else self.reference_time]),
                allow_pickle=False)

    def _load_state(self, path: Path) -> None:
        self.item_embedding = np.load(path / "item_embedding.npy", allow_pickle=False)
        self.item_bias = np.load(path / "item_bias.npy", allow_pickle=False)
        self.repeat = float(np.load(path / "repeat.npy", allow_pickle=False)[0])
        reference = float(np.load(path / "reference_time.npy", allow_pickle=False)[0])
        self.reference_time = None if np.isnan(reference) else reference
