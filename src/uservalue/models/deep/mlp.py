"""Deep collaborative-filtering-style MLP with a ZILN head ("mlp"): aggregate tower, hashed
user-id embedding and pooled category/item embeddings of the last L events; see docs/models.md."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from uservalue.models.deep.data import AggregateStats, TokenStats
from uservalue.models.deep.layers import (
    AggregateNorm,
    HashedEmbedding,
    aggregate_tower,
    hide_ids,
    mlp,
)
from uservalue.models.deep.model import TorchParams, TorchValueModel
from uservalue.models.deep.ziln import ZilnHead


class MlpParams(TorchParams):
    hidden: tuple[int, ...] = Field((128, 64), min_length=1, description="sizes of the hidden layers after the concat")
    embedding_dim: int = Field(16, ge=1)
    user_buckets: int = Field(32_768, ge=0, description="hashed user-id embedding buckets (0: none)")
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(512, ge=1)
    max_epochs: int = Field(30, ge=1)
    patience: int = Field(4, ge=1)


def masked_mean(embedding: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean embedding of the non-zero ids among each row's first `lengths` positions."""
    valid = (ids > 0) & (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None])
    vectors = embedding(ids) * valid.unsqueeze(-1)
    return vectors.sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp_min(1)


class MlpNetwork(nn.Module):
    def __init__(self, p: MlpParams, n_categories: int, n_items: int, agg_stats: AggregateStats,
                 token_stats: TokenStats, bias: tuple[float, ...],
                 text_columns: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.agg_stats, self.token_stats, self.initial_bias = agg_stats, token_stats, bias
        self.id_dropout = p.id_dropout
        d = p.embedding_dim
        self.norm = AggregateNorm(agg_stats)
        self.tower, tower_width = aggregate_tower(agg_stats, p.tower, p.dropout, text_columns, p.text_tower)
        self.user = nn.Embedding(p.user_buckets, d) if p.user_buckets > 0 else None
        if self.user is not None:
            nn.init.normal_(self.user.weight, std=0.01)
        self.category = HashedEmbedding(n_categories, d)
        self.item = HashedEmbedding(n_items, d)
        width = tower_width + d * (3 if self.user is not None else 2)
        self.body = mlp([width, *p.hidden], p.dropout)
        self.head = ZilnHead(p.hidden[-1], bias)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rate = self.id_dropout if self.training else 0.0
        category, item = hide_ids(batch["category"], batch["item"], rate)
        parts = [
            self.tower(self.norm(batch["agg"])),
            masked_mean(self.category, category, batch["lengths"]),
            masked_mean(self.item, item, batch["lengths"]),
        ]
        if self.user is not None:
            user = self.user(batch["user_bucket"])
            if rate > 0:
                user = user * (torch.rand(user.shape[0], 1, device=user.device) >= rate)
            parts.append(user)
        return self.head(self.body(torch.cat(parts, dim=-1)))


class MlpModel(TorchValueModel):
    name: ClassVar[str] = "mlp"
    Params = MlpParams
    traced_inference: ClassVar[bool] = True  # forward() branches on configuration only, never on data

    @property
    def user_buckets(self) -> int:
        return max(self.params.user_buckets, 1)  # type: ignore[attr-defined]

    def build_network(self, agg_stats: AggregateStats, token_stats: TokenStats,
                      bias: tuple[float, ...]) -> nn.Module:
        return MlpNetwork(self.params, self.spec.category_buckets, self.spec.item_buckets,  # type: ignore[arg-type]
                          agg_stats, token_stats, bias, tuple(self.spec.text_columns))
