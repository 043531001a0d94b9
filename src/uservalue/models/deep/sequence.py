"""Behaviour-sequence model with a ZILN head ("sequence"): Transformer, GRU or LSTM over the last L
events, behaviour-gated attention pooling, aggregate tower; see docs/models.md."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from uservalue.models.deep.data import AggregateStats, TokenStats
from uservalue.models.deep.layers import (
    AggregateNorm,
    HashedEmbedding,
    TokenNorm,
    aggregate_tower,
    hide_ids,
    mlp,
)
from uservalue.models.deep.model import TorchParams, TorchValueModel
from uservalue.models.deep.ziln import ZilnHead

NEG = -1e9


class SequenceParams(TorchParams):
    encoder: Literal["transformer", "gru", "lstm"] = "transformer"
    d_model: int = Field(32, ge=4)
    n_layers: int = Field(1, ge=1)
    n_heads: int = Field(2, ge=1)
    causal: bool = Field(False, description="transformer only: each event attends to earlier events only")
    hidden: tuple[int, ...] = Field((64,), min_length=1)
    lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(256, ge=1)
    max_epochs: int = Field(10, ge=1)
    patience: int = Field(3, ge=1)
    # The text columns share the aggregate tower here: on bench/text_quality.py's planted-word log (3
    # training seeds) text adds +0.035 Gini through the shared tower and +0.015 through a tower of its own;
    # mlp and gnn gain more with their own (+0.023 / +0.007 against +0.020 / -0.004 shared).
    text_tower: int = Field(0, ge=0, description="width of a pooled item-text tower of its own (0: the text "
                                                 "columns join the aggregate tower)")


class SequenceNetwork(nn.Module):
    def __init__(self, p: SequenceParams, n_behaviors: int, n_categories: int, n_items: int,
                 agg_stats: AggregateStats, token_stats: TokenStats, bias: tuple[float, ...],
                 text_columns: tuple[str, ...] = ()) -> None:
        super().__init__()
        if p.d_model % p.n_heads:
            raise ValueError("d_model must be a multiple of n_heads")
        self.agg_stats, self.token_stats, self.initial_bias = agg_stats, token_stats, bias
        d = p.d_model
        self.encoder_kind, self.causal, self.id_dropout = p.encoder, p.causal, p.id_dropout
        self.norm = AggregateNorm(agg_stats)
        self.token_norm = TokenNorm(token_stats)
        self.behavior = nn.Embedding(n_behaviors + 1, d, padding_idx=0)
        self.category = HashedEmbedding(n_categories, d)
        self.item = HashedEmbedding(n_items, d)
        self.time = nn.Linear(3, d)
        self.token_ln = nn.LayerNorm(d)
        self.dropout = nn.Dropout(p.dropout)
        if p.encoder == "transformer":
            layer = nn.TransformerEncoderLayer(d, p.n_heads, dim_feedforward=2 * d, dropout=p.dropout,
                                               activation="gelu", batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, p.n_layers, enable_nested_tensor=False)
        else:
            recurrent = nn.GRU if p.encoder == "gru" else nn.LSTM
            self.encoder = recurrent(d, d, p.n_layers, batch_first=True, dropout=p.dropout if p.n_layers > 1 else 0.0)
        self.out_ln = nn.LayerNorm(d)
        self.score = nn.Linear(d, 1)
        self.gate = nn.Parameter(torch.zeros(n_behaviors + 1))
        self.tower, tower_width = aggregate_tower(agg_stats, p.tower, p.dropout, text_columns, p.text_tower)
        self.body = mlp([d + tower_width, *p.hidden], p.dropout)
        self.head = ZilnHead(p.hidden[-1], bias)

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        behavior, lengths = batch["behavior"], batch["lengths"]
        width = behavior.shape[1]
        valid = torch.arange(width, device=behavior.device)[None, :] < lengths[:, None]
        category, item = hide_ids(batch["category"], batch["item"], self.id_dropout if self.training else 0.0)
        x = (self.behavior(behavior) + self.category(category) + self.item(item)
             + self.time(self.token_norm(batch["continuous"])))
        x = self.dropout(self.token_ln(x)) * valid.unsqueeze(-1)
        empty = lengths == 0
        if self.encoder_kind == "transformer":
            padding = ~valid
            padding[:, 0] &= ~empty  # a user without events attends to one blank token (zeroed below)
            mask = (torch.ones(width, width, dtype=torch.bool, device=x.device).triu(1) if self.causal else None)
            h = self.encoder(x, mask=mask, src_key_padding_mask=padding, is_causal=self.causal)
        else:
            # float32 recurrence: cuDNN's GRU and LSTM do not take bfloat16 everywhere. Padding comes
            # after a user's events, so the outputs at real positions never saw it.
            with torch.autocast(device_type=x.device.type, enabled=False):
                h, _ = self.encoder(x.float())
        h = self.out_ln(h)
        scores = self.score(h).squeeze(-1).float() + self.gate[behavior]
        scores = scores.masked_fill(~valid, NEG)
        weights = torch.softmax(scores, dim=1) * valid
        return torch.einsum("bt,btd->bd", weights.to(h.dtype), h)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.pooled(batch), self.tower(self.norm(batch["agg"]))]
        return self.head(self.body(torch.cat([p.to(parts[1].dtype) for p in parts], dim=-1)))


class SequenceModel(TorchValueModel):
    name: ClassVar[str] = "sequence"
    Params = SequenceParams
    # Served traced (model.py: checked against eager on two shapes first): one user's forward pass with
    # its Shapley coalitions 0.25 ms traced against 0.6 ms eager (issue 15).
    traced_inference: ClassVar[bool] = True

    def build_network(self, agg_stats: AggregateStats, token_stats: TokenStats,
                      bias: tuple[float, ...]) -> nn.Module:
        return SequenceNetwork(self.params, len(self.spec.behaviors), self.spec.category_buckets,  # type: ignore[arg-type]
                               self.spec.item_buckets, agg_stats, token_stats, bias, tuple(self.spec.text_columns))
