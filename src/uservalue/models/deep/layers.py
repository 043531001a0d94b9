"""Network layers shared by the deep models: input standardisation (its statistics live in the
state_dict), hashed id embeddings with a vocabulary, id dropout, and MLP stacks."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from uservalue.models.deep.data import AggregateStats, TokenStats


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


def hide_ids(category: torch.Tensor, item: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time id dropout: each event's category and item id is replaced by the padding id
    with probability `rate` (the hashed id tables are what a small data set memorises first)."""
    if rate <= 0:
        return category, item
    hidden = torch.rand(category.shape, device=category.device) < rate
    return category.masked_fill(hidden, 0), item.masked_fill(hidden, 0)


class TextSplitTower(nn.Module):
    """The aggregate tower of a spec with pooled item-text columns (issue 23): the text columns get a
    tower of their own next to the aggregates'. The text vectors are dense and signed where the
    aggregates are counts on a log scale; in one shared first layer the ~50 text inputs crowd the
    aggregates' few informative ones, while a tower of their own lets the network learn a small text
    summary next to them."""

    def __init__(self, columns: tuple[str, ...], text_columns: tuple[str, ...], width: int, text_width: int,
                 dropout: float) -> None:
        super().__init__()
        text = set(text_columns)
        text_index = [i for i, column in enumerate(columns) if column in text]
        rest = [i for i, column in enumerate(columns) if column not in text]
        # constants of the column order (persistent=False: rebuilt from the statistics and the spec)
        self.register_buffer("agg_index", torch.as_tensor(rest, dtype=torch.long), persistent=False)
        self.register_buffer("text_index", torch.as_tensor(text_index, dtype=torch.long), persistent=False)
        self.aggregates = mlp([len(rest), width], dropout)
        self.text = mlp([len(text_index), text_width], dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.aggregates(x.index_select(1, self.agg_index)),
                          self.text(x.index_select(1, self.text_index))], dim=-1)


def aggregate_tower(stats: AggregateStats, width: int, dropout: float, text_columns: tuple[str, ...] = (),
                    text_width: int = 0) -> tuple[nn.Module, int]:
    """The tower over the standardised aggregates and its output width: one MLP layer (the state_dict
    of models without text is unchanged), or a TextSplitTower when the columns hold pooled item text
    and `text_width` > 0."""
    if text_width > 0 and set(text_columns) & set(stats.columns):
        return TextSplitTower(stats.columns, text_columns, width, text_width, dropout), width + text_width
    return mlp([len(stats.columns), width], dropout), width


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    """Linear -> GELU -> Dropout for each consecutive pair of `sizes`."""
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)
