"""The learned recommender: next-item prediction. A user is encoded from their last `sequence_length`
events (items and behaviours) by a GRU or a behaviour- and recency-weighted mean of item embeddings; every
catalogue item is scored by a dot product with its output embedding, its bias, and learned weights on
how often the user already had it (repeat interest), its category (category interest) and its summed
item-to-item similarity to the user's items (`neighbors` > 0: the co-occurrence of uservalue.recs.baselines
as one more learned input). Trained with a full softmax over the catalogue on
(history -> next item) pairs before the cutoff, over the catalogue or (negatives > 0) over the batch's targets
and that many uniformly sampled items, with the log-probability of being sampled subtracted (logQ correction). CPU in CI; CUDA with bf16 autocast when present."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from uservalue.models.deep.runtime import resolve_device, seed_everything, training_autocast
from uservalue.recs.base import FitOptions, Histories, Recommender
from uservalue.recs.baselines import similarity
from uservalue.schema import DEFAULT_BEHAVIORS

ENCODERS = ("mean", "gru")


class NextItemNet(nn.Module):
    def __init__(self, n_items: int, dim: int, length: int, encoder: str, item_category: np.ndarray) -> None:
        super().__init__()
        self.n_items, self.encoder_kind = n_items, encoder
        self.n_categories = int(item_category.max()) + 2 if len(item_category) else 1
        # Category of item i + 1 (0: padding or none), a buffer so that it is saved with the weights.
        self.register_buffer("category_of", torch.from_numpy(np.concatenate([[0], item_category + 1])).long())
        # Sparse gradients (SparseAdam): a step touches only the items of its batch, not the whole catalogue.
        self.item_in = nn.Embedding(n_items + 1, dim, padding_idx=0, sparse=True)  # index 0: padding, item i at i + 1
        self.behavior_in = nn.Embedding(len(DEFAULT_BEHAVIORS) + 1, dim, padding_idx=0)
        self.behavior_weight = nn.Embedding(len(DEFAULT_BEHAVIORS) + 1, 1)  # mean: how much each behaviour counts
        self.position_weight = nn.Embedding(length, 1)  # mean: how much each position (from the newest) counts
        self.gru = nn.GRU(dim, dim, batch_first=True) if encoder == "gru" else None
        self.project = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim))
        self.item_out = nn.Embedding(n_items, dim, sparse=True)
        self.item_bias = nn.Embedding(n_items, 1, sparse=True)
        self.repeat = nn.Parameter(torch.tensor(1.0))
        self.category_repeat = nn.Parameter(torch.tensor(1.0))
        self.neighbour = nn.Parameter(torch.tensor(1.0))
        nn.init.normal_(self.item_in.weight, std=0.05)
        nn.init.zeros_(self.item_out.weight)  # starts as a ranker of the learned-weight terms; embeddings add to it
        nn.init.zeros_(self.item_bias.weight)
        nn.init.zeros_(self.behavior_weight.weight)
        nn.init.zeros_(self.position_weight.weight)

    def forward(self, items: torch.Tensor, behaviors: torch.Tensor, candidates: torch.Tensor | None = None,
                neighbours: torch.Tensor | None = None) -> torch.Tensor:
        """items, behaviors: (batch, length), left-padded with 0 (the newest event last) -> (batch, items) logits
        (of `candidates` only, when given: catalogue indices)."""
        mask = (items > 0).float()
        x = self.item_in(items) + self.behavior_in(behaviors)
        if self.gru is not None:
            out, _ = self.gru(x)
            user = out[:, -1]
        else:
            positions = torch.arange(items.shape[1] - 1, -1, -1, device=items.device)
            logit = self.behavior_weight(behaviors).squeeze(-1) + self.position_weight(positions).squeeze(-1)
            weight = torch.exp(logit) * mask
            user = (weight.unsqueeze(-1) * x).sum(1) / weight.sum(1, keepdim=True).clamp_min(1e-6)
        user = self.project(user)
        if candidates is None:
            candidates = torch.arange(self.n_items, device=items.device)
        # How often each candidate (sorted, unique) is among the user's items: only the (user, event) pairs
        # that hit a candidate are counted, never a users x catalogue matrix.
        position = torch.searchsorted(candidates, (items - 1).clamp_min(0)).clamp_max(len(candidates) - 1)
        hit = (items > 0) & (candidates[position] == items - 1)
        rows = torch.arange(items.shape[0], device=items.device).unsqueeze(1).expand_as(items)
        counts = torch.zeros(items.shape[0], len(candidates), device=items.device, dtype=user.dtype)
        counts.index_put_((rows[hit], position[hit]), torch.ones((), device=items.device, dtype=user.dtype),
                          accumulate=True)
        category_counts = torch.zeros(items.shape[0], self.n_categories, device=items.device, dtype=user.dtype)
        category_counts.scatter_add_(1, self.category_of[items], mask.to(user.dtype))
        category_counts[:, 0] = 0  # no category: no category interest
        logits = (user @ self.item_out(candidates).T + self.item_bias(candidates).squeeze(-1)
                  + self.repeat * torch.log1p(counts)
                  + self.category_repeat * torch.log1p(category_counts[:, self.category_of[candidates + 1]]))
        return logits if neighbours is None else logits + self.neighbour * torch.log1p(neighbours)


def _windows(histories: Histories, users: np.ndarray, ends: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(items + 1, behaviours + 1) of each user's `length` known-item events before row `ends`, left-padded."""
    items = np.zeros((len(users), length), np.int64)
    behaviors = np.zeros((len(users), length), np.int64)
    for row, (user, end) in enumerate(zip(users, ends, strict=True)):
        rows = histories.user_slice(int(user))
        item, behavior = histories.item[rows.start:end], histories.behavior[rows.start:end]
        known = item >= 0
        item, behavior = item[known][-length:], behavior[known][-length:]
        if len(item):
            items[row, -len(item):] = item + 1
            behaviors[row, -len(item):] = behavior + 1
    return items, behaviors


class NextItem(Recommender):
    kind = "nextitem"

    def __init__(self, encoder: str = "mean", dim: int = 32, sequence_length: int = 50, samples_per_user: int = 5,
                 epochs: int = 4, batch_size: int = 512, learning_rate: float = 0.005,
                 max_train_examples: int = 400_000, negatives: int = 1000, neighbors: int = 100,
                 **params: object) -> None:
        if encoder not in ENCODERS:
            raise ValueError(f"encoder {encoder!r}; expected one of {ENCODERS}")
        super().__init__(encoder=encoder, dim=dim, sequence_length=sequence_length, samples_per_user=samples_per_user,
                         epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                         max_train_examples=max_train_examples, negatives=negatives, neighbors=neighbors, **params)
        self.net: NextItemNet | None = None
        self.similar: sp.csr_matrix | None = None

    def _new_net(self) -> NextItemNet:
        p = self.params
        return NextItemNet(len(self.catalog), int(p["dim"]), int(p["sequence_length"]), str(p["encoder"]),
                           self.item_category)

    def _examples(self, histories: Histories, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(user, row of the target event) pairs: up to samples_per_user targets per user, each with history."""
        users, ends = [], []
        per_user = int(self.params["samples_per_user"])
        for user in range(len(histories.users)):
            rows = histories.user_slice(user)
            known = np.flatnonzero(histories.item[rows] >= 0)[1:] + rows.start  # a target needs a known item before it
            if len(known) > per_user:
                known = rng.choice(known, per_user, replace=False)
            users.append(np.full(len(known), user))
            ends.append(known)
        user_arr, end_arr = np.concatenate(users), np.concatenate(ends)
        limit = int(self.params["max_train_examples"])
        if len(user_arr) > limit:
            keep = rng.choice(len(user_arr), limit, replace=False)
            user_arr, end_arr = user_arr[keep], end_arr[keep]
        return user_arr, end_arr

    def _fit(self, histories: Histories, cutoff: dt.datetime, options: FitOptions) -> dict[str, float]:
        seed_everything(options.seed)
        device = resolve_device(options.device)
        rng = np.random.default_rng(options.seed)
        users, ends = self._examples(histories, rng)
        items, behaviors = _windows(histories, users, ends, int(self.params["sequence_length"]))
        targets = histories.item[ends]
        if int(self.params["neighbors"]) > 0:
            self.similar = similarity(histories, len(self.catalog), int(self.params["neighbors"]),
                                      int(self.params["sequence_length"]))
        similar_columns = self.similar.tocsc() if self.similar is not None else None
        self.net = self._new_net().to(device)
        learning_rate = float(self.params["learning_rate"])
        sparse = [self.net.item_in.weight, self.net.item_out.weight, self.net.item_bias.weight]
        dense = [p for p in self.net.parameters() if all(p is not q for q in sparse)]
        optimizers = [torch.optim.SparseAdam(sparse, lr=learning_rate), torch.optim.Adam(dense, lr=learning_rate)]
        batch, negatives, n_items = int(self.params["batch_size"]), int(self.params["negatives"]), len(self.catalog)
        sampled = 0 < negatives < n_items
        # P(an item is among a batch's candidates): the uniform draws, or the targets (drawn by frequency).
        frequency = torch.from_numpy(np.bincount(targets, minlength=n_items) / len(targets))
        inclusion = 1 - (1 - 1 / n_items) ** negatives + 1 - (1 - frequency) ** batch
        log_q = torch.log(inclusion.clamp(max=1.0)).float().to(device)
        items_t, behaviors_t, targets_t = (torch.from_numpy(a) for a in (items, behaviors, targets))
        loss, seconds = float("nan"), []
        for epoch in range(int(self.params["epochs"])):
            started = time.perf_counter()
            self.net.train()
            order = torch.from_numpy(rng.permutation(len(targets)))
            total, count = 0.0, 0
            for start in range(0, len(order), batch):
                pick = order[start:start + batch]
                target = targets_t[pick].to(device)
                with training_autocast(device):
                    if sampled:
                        drawn = torch.randint(0, n_items, (negatives,), device=device)
                        candidates, label = torch.unique(torch.cat([target, drawn]), return_inverse=True)
                        neighbours = self._neighbours(items[pick.numpy()], similar_columns, candidates.cpu().numpy())
                        logits = self.net(items_t[pick].to(device), behaviors_t[pick].to(device), candidates,
                                          None if neighbours is None else neighbours.to(device))
                        logits = logits.float() - log_q[candidates]
                        batch_loss = nn.functional.cross_entropy(logits, label[:len(pick)])
                    else:
                        neighbours = self._neighbours(items[pick.numpy()], self.similar, None)
                        logits = self.net(items_t[pick].to(device), behaviors_t[pick].to(device), None,
                                          None if neighbours is None else neighbours.to(device))
                        batch_loss = nn.functional.cross_entropy(logits.float(), target)
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                batch_loss.backward()
                for optimizer in optimizers:
                    optimizer.step()
                total += float(batch_loss.detach()) * len(pick)
                count += len(pick)
            loss = total / max(count, 1)
            seconds.append(time.perf_counter() - started)
            if options.log_metrics is not None:
                options.log_metrics({"recs_nextitem_loss": loss, "recs_nextitem_epoch_seconds": seconds[-1]}, epoch)
        self.net = self.net.cpu().eval()
        return {"train_examples": float(len(targets)), "final_loss": loss,
                "seconds_per_epoch": float(np.mean(seconds)) if seconds else 0.0}

    def _score(self, histories: Histories, users: np.ndarray) -> np.ndarray:
        assert self.net is not None, "fit or load the model first"
        ends = histories.offsets[users + 1]
        items, behaviors = _windows(histories, users, ends, int(self.params["sequence_length"]))
        with torch.inference_mode():
            return self.net(torch.from_numpy(items), torch.from_numpy(behaviors), None,
                            self._neighbours(items, self.similar, None)).float().numpy()

    def _neighbours(self, items: np.ndarray, similar: sp.spmatrix | None, candidates: np.ndarray | None) -> torch.Tensor | None:
        """(users, candidates) summed similarity of each candidate to the distinct items of each window."""
        if similar is None:
            return None
        rows, cols = np.nonzero(items)
        x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, items[rows, cols] - 1)),
                          shape=(len(items), len(self.catalog)))
        x.data[:] = 1.0  # distinct items (duplicates were summed)
        columns = similar if candidates is None else similar[:, candidates]
        return torch.from_numpy(np.asarray((x @ columns).todense(), dtype=np.float32))

    def _save_state(self, path: Path) -> None:
        assert self.net is not None, "fit the model first"
        torch.save(self.net.state_dict(), path / "net.pt")
        if self.similar is not None:
            sp.save_npz(path / "similar.npz", self.similar)
        (path / "net.json").write_text(json.dumps({"n_items": len(self.catalog)}))

    def _load_state(self, path: Path) -> None:
        self.net = self._new_net()
        self.net.load_state_dict(torch.load(path / "net.pt", weights_only=True, map_location="cpu"))
        self.similar = sp.load_npz(path / "similar.npz").tocsr() if (path / "similar.npz").is_file() else None
        self.net.eval()
