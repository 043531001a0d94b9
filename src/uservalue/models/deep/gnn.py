"""Multi-relational graph value model with a ZILN head ("gnn"): users, item buckets and category
buckets as nodes, one edge type per behaviour weighted by recency, LightGCN-style propagation;
see docs/models.md.

The graph of a cutoff is built from the feature rows at that cutoff (their last L events, all
strictly before it): a user's events are its edges. Item and category embeddings are propagated
through the users of the training graph (two hops, per behaviour, top-k neighbours kept); a user is
embedded by one propagation step from those node embeddings over its own edges. That step reads
nothing but the user's own events, so a user unseen in training (at serving time, from its request
or stored history) is embedded the same way as a training user.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from pydantic import Field
from torch import nn

from uservalue.errors import InputError
from uservalue.features.sql import FeatureSpec
from uservalue.io import atomic_path
from uservalue.models.base import FitContext
from uservalue.models.deep.data import AggregateStats, FeatureTensors, TokenStats
from uservalue.models.deep.layers import (
    AggregateNorm,
    HashedEmbedding,
    aggregate_tower,
    hide_ids,
    mlp,
)
from uservalue.models.deep.model import TorchParams, TorchValueModel
from uservalue.models.deep.ziln import ZilnHead

GRAPH_FILE = "graph.npz"
LN2 = math.log(2.0)
# Rows of the 2-hop product materialised at once while the graph is built (bounds its memory).
PRODUCT_CELLS = 1 << 23


class GnnParams(TorchParams):
    embedding_dim: int = Field(32, ge=1, description="width of the item, category and user embeddings")
    layers: int = Field(1, ge=0, description="two-hop node propagations through the users (LightGCN layers 2, 4, ...)")
    neighbors: int = Field(16, ge=1, description="two-hop neighbours kept per node and behaviour (the heaviest)")
    half_life_days: float = Field(30.0, gt=0, description="an edge's weight halves every this many days before the cutoff")
    graph_users: int = Field(20_000, ge=1, description="at most this many users (sampled) build a cutoff's graph")
    hidden: tuple[int, ...] = Field((64,), min_length=1, description="sizes of the hidden layers after the concat")
    id_dropout: float = Field(0.3, ge=0, lt=1, description="training: share of edges whose node id is hidden")
    # Every training step propagates over the whole node set: larger batches than the other deep
    # models (LightGCN trains with batches of thousands too).
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(1024, ge=1)
    max_epochs: int = Field(30, ge=1)
    patience: int = Field(3, ge=1)


# --------------------------------------------------------------------------------------------
# the graph of one cutoff
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CutoffGraph:
    """What the network keeps of one cutoff's graph. Nodes are the item buckets 0..I then the
    category buckets 0..C (I + C + 2 nodes; bucket 0 of each is "none" and has no edge)."""

    neighbors: np.ndarray  # int64 [R, N, k]: per behaviour r, node n's heaviest two-hop neighbours
    weights: np.ndarray  # float32 [R, N, k]: their weights (0 where fewer than k)
    degree: np.ndarray  # float32 [N]: each node's weighted degree (every behaviour)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"neighbors": self.neighbors, "weights": self.weights, "degree": self.degree}


def edge_weights(log_age_days: np.ndarray, half_life_days: float) -> np.ndarray:
    """Recency weight of an event from its seq_log_age_days (ln(1 + days before the cutoff))."""
    age = np.expm1(np.clip(np.asarray(log_age_days, dtype=np.float64), 0.0, 50.0))
    return np.exp(-LN2 * age / float(half_life_days))


def node_ids(item: np.ndarray, category: np.ndarray, item_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """(item node, category node) of each event: items first, then categories."""
    return item.astype(np.int64), category.astype(np.int64) + item_buckets + 1


def build_graph(behavior: np.ndarray, item: np.ndarray, category: np.ndarray, log_age_days: np.ndarray,
                lengths: np.ndarray, *, n_behaviors: int, item_buckets: int, category_buckets: int,
                half_life_days: float, neighbors: int) -> CutoffGraph:
    """One cutoff's graph from its users' padded event arrays ([U, L] each, as FeatureTensors).

    A is the users x nodes adjacency (an event links its user to its item and to its category with
    the event's recency weight; one relation per behaviour, A = sum_r A_r), normalised as LightGCN
    does: Â_r = D_u^-1/2 A_r D_n^-1/2. A node's two-hop neighbours through behaviour r are the rows
    of Â_rᵀ Â (node -r- user - node), of which the `neighbors` heaviest are kept per node."""
    n_users, width = behavior.shape
    n_nodes = item_buckets + category_buckets + 2
    valid = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    items, categories = node_ids(item, category, item_buckets)
    weight = edge_weights(log_age_days, half_life_days)
    rows = np.broadcast_to(np.arange(n_users)[:, None], behavior.shape)
    parts = []
    for nodes, present in ((items, item > 0), (categories, category > 0)):
        keep = valid & present
        parts.append((rows[keep], nodes[keep], weight[keep], behavior[keep].astype(np.int64)))
    user, node, w, relation = (np.concatenate(column) for column in zip(*parts, strict=True))
    if node.size and (node.max() >= n_nodes or node.min() < 0):
        raise InputError("features", "item or category bucket out of range", column="seq_item/seq_category",
                         expected=f"items in [0, {item_buckets}], categories in [0, {category_buckets}]")
    whole = sp.csr_matrix((w, (user, node)), shape=(n_users, n_nodes))
    user_degree = np.asarray(whole.sum(axis=1)).ravel()
    node_degree = np.asarray(whole.sum(axis=0)).ravel()
    scale_user = 1.0 / np.sqrt(np.maximum(user_degree, 1e-12))
    scale_node = 1.0 / np.sqrt(np.maximum(node_degree, 1e-12))
    normalised = sp.csr_matrix((w * scale_user[user] * scale_node[node], (user, node)), shape=(n_users, n_nodes))
    k = int(neighbors)
    out_nodes = np.zeros((n_behaviors, n_nodes, k), dtype=np.int64)
    out_weights = np.zeros((n_behaviors, n_nodes, k), dtype=np.float32)
    for r in range(n_behaviors):
        mine = relation == r + 1
        transposed = sp.csr_matrix((w[mine] * scale_user[user[mine]] * scale_node[node[mine]],
                                    (node[mine], user[mine])), shape=(n_nodes, n_users))
        busy = np.flatnonzero(np.diff(transposed.indptr) > 0)
        # a row of the product holds at most n_nodes cells: chunks of rows bound the memory
        step = max(PRODUCT_CELLS // n_nodes, 1)
        for start in range(0, busy.size, step):
            chunk = busy[start:start + step]
            product = (transposed[chunk] @ normalised).toarray()
            chosen, values = top_k_columns(product, k)
            out_nodes[r, chunk] = chosen
            out_weights[r, chunk] = values
    return CutoffGraph(out_nodes, out_weights, node_degree.astype(np.float32))


def graph_edges(graph: CutoffGraph) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(target node, source node, behaviour index, weight) of each kept two-hop neighbour."""
    relation, target, slot = np.nonzero(graph.weights > 0)
    return target, graph.neighbors[relation, target, slot], relation, graph.weights[relation, target, slot]


def top_k_columns(dense: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the columns of the k largest positive values, heaviest first (ties: lower column
    first), and those values; padded with column 0 and value 0 where a row has fewer."""
    rows, n = dense.shape
    if n > k:
        candidates = np.argpartition(-dense, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(n), (rows, n))
    values = np.take_along_axis(dense, candidates, axis=1)
    order = np.lexsort((candidates, -values), axis=1)
    columns = np.take_along_axis(candidates, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    positive = values > 0
    out_columns = np.zeros((rows, k), dtype=np.int64)
    out_values = np.zeros((rows, k), dtype=np.float32)
    out_columns[:, :columns.shape[1]] = np.where(positive, columns, 0)
    out_values[:, :values.shape[1]] = np.where(positive, values, 0)
    return out_columns, out_values


# --------------------------------------------------------------------------------------------
# sparse propagation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseOperator:
    """A constant sparse [N, N] matrix and its transpose: scipy CSR on the CPU (several times faster
    there than torch's sparse kernels), torch CSR on CUDA."""

    forward: Any
    transposed: Any

    @classmethod
    def of(cls, target: torch.Tensor, source: torch.Tensor, weight: torch.Tensor, n: int) -> SparseOperator:
        if target.device.type == "cpu":
            t, s_, w = target.numpy(), source.numpy(), weight.numpy()
            return cls(sp.csr_matrix((w, (t, s_)), shape=(n, n)), sp.csr_matrix((w, (s_, t)), shape=(n, n)))
        coo = torch.sparse_coo_tensor(torch.stack([target, source]), weight, (n, n), check_invariants=True).coalesce()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is not
            warnings.simplefilter("ignore", UserWarning)
            return cls(coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr())

    def apply(self, dense: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
        matrix = self.transposed if transposed else self.forward
        if isinstance(matrix, sp.spmatrix):
            return torch.from_numpy(np.asarray(matrix @ dense.detach().numpy(), dtype=np.float32))
        return matrix @ dense


class SparseMatmul(torch.autograd.Function):
    """operator @ dense, differentiable in `dense` (the operator is a constant)."""

    @staticmethod
    def forward(ctx: Any, dense: torch.Tensor, operator: SparseOperator) -> torch.Tensor:  # type: ignore[override]
        ctx.operator = operator
        return operator.apply(dense)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return ctx.operator.apply(grad.contiguous(), transposed=True), None


# --------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------
class GnnNetwork(nn.Module):
    """Node propagation over the cutoff graphs, one user step over a row's own edges, aggregate
    tower, ZILN head. A row's graph is named by its `user_bucket` input (0: the newest cutoff's,
    the one scoring uses; see GnnModel.tensors)."""

    def __init__(self, p: GnnParams, n_behaviors: int, n_categories: int, n_items: int, graphs: list[CutoffGraph],
                 agg_stats: AggregateStats, token_stats: TokenStats, bias: tuple[float, ...],
                 text_columns: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.agg_stats, self.token_stats, self.initial_bias = agg_stats, token_stats, bias
        self.id_dropout, self.layers, self.n_items = p.id_dropout, p.layers, n_items
        self.decay = LN2 / p.half_life_days
        d = p.embedding_dim
        self.norm = AggregateNorm(agg_stats)
        self.tower, tower_width = aggregate_tower(agg_stats, p.tower, p.dropout, text_columns, p.text_tower)
        self.item = HashedEmbedding(n_items, d)
        self.category = HashedEmbedding(n_categories, d)
        # one relation per behaviour: a diagonal transform of the item and category messages, a
        # relation embedding, and (node side) the weight of that behaviour's two-hop neighbours
        self.relation_item = nn.Parameter(torch.ones(n_behaviors + 1, d))
        self.relation_category = nn.Parameter(torch.ones(n_behaviors + 1, d))
        self.relation = nn.Embedding(n_behaviors + 1, d, padding_idx=0)
        nn.init.normal_(self.relation.weight, std=0.1)
        with torch.no_grad():
            self.relation.weight[0].zero_()
        self.hop = nn.Parameter(torch.zeros(n_behaviors))
        self.user_dropout = nn.Dropout(p.dropout)
        self.body = mlp([d + tower_width, *p.hidden], p.dropout)
        self.head = ZilnHead(p.hidden[-1], bias)
        # the graphs' two-hop edges (target node, source node, behaviour, weight), padded to one length
        # with weight-0 edges: constants rebuilt from the training rows (persistent=False: not in the
        # state_dict; the model saves the graph itself)
        edges = [graph_edges(g) for g in graphs]
        width = max(max((e[0].size for e in edges), default=0), 1)
        stacked = [np.stack([np.pad(e[i], (0, width - e[i].size)) for e in edges]) for i in range(4)]
        for name, values in zip(("edge_target", "edge_source", "edge_relation"), stacked[:3], strict=True):
            self.register_buffer(name, torch.from_numpy(values.astype(np.int64)), persistent=False)
        self.register_buffer("edge_weight", torch.from_numpy(stacked[3].astype(np.float32)), persistent=False)
        self.register_buffer("degree", torch.from_numpy(np.stack([g.degree for g in graphs])), persistent=False)
        self._frozen: torch.Tensor | None = None  # the node embeddings while scoring (see nodes())
        self._operators_cache: dict[tuple[int, str], list[SparseOperator]] = {}

    # the scoring cache of the node embeddings goes whenever the weights may change
    def train(self, mode: bool = True) -> GnnNetwork:
        self._frozen = None
        return super().train(mode)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._frozen = None
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> GnnNetwork:
        self._frozen, self._operators_cache = None, {}
        return super()._apply(fn, *args, **kwargs)

    def keep_graphs(self, count: int) -> None:
        """Drop every graph after the first `count` (those scoring never reads)."""
        for name in ("edge_target", "edge_source", "edge_relation", "edge_weight", "degree"):
            setattr(self, name, getattr(self, name)[:count].clone())
        self._frozen, self._operators_cache = None, {}

    def _operators(self, graph: int) -> list[SparseOperator]:
        """Graph `graph`'s two-hop matrices, one per behaviour, on the buffers' device (built once)."""
        key = (graph, str(self.degree.device))
        if key not in self._operators_cache:
            n_nodes = self.degree.shape[1]
            relation = self.edge_relation[graph]
            self._operators_cache[key] = [
                SparseOperator.of(self.edge_target[graph][relation == r], self.edge_source[graph][relation == r],
                                  self.edge_weight[graph][relation == r], n_nodes)
                for r in range(self.hop.shape[0])]
        return self._operators_cache[key]

    def propagate(self) -> torch.Tensor:
        """Node embeddings per graph [G, N, d]: the mean of LightGCN's node layers 0, 2, ..., 2·layers,
        where layer 2j+2 = sum_r softplus(hop_r)/ln 2 · (Â_rᵀÂ)_top-k · layer 2j (hop_r starts at 1)."""
        with torch.autocast(device_type=self.degree.device.type, enabled=False):
            base = torch.cat([self.item.table.weight * self.item.known[:, None],
                              self.category.table.weight * self.category.known[:, None]]).float()
            hop = nn.functional.softplus(self.hop).float() / LN2
            out = []
            for graph in range(self.degree.shape[0]):
                operators = self._operators(graph)
                layer, total = base, base
                for _ in range(self.layers):
                    layer = sum(hop[r] * SparseMatmul.apply(layer, op) for r, op in enumerate(operators))
                    total = total + layer
                out.append(total / (self.layers + 1))
            return torch.stack(out)

    def nodes(self) -> torch.Tensor:
        """propagate(), computed once while scoring (no autograd, weights fixed)."""
        if self.training or torch.is_grad_enabled():
            return self.propagate()
        frozen = self._frozen
        if frozen is None or frozen.device != self.degree.device:
            frozen = self._frozen = self.propagate()
        return frozen

    def user(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One LightGCN step over each row's own edges: sum over its events e of
        w_e / sqrt(d_u d_n) · (relation_r ⊙ node), for its item and its category, plus the recency-
        weighted relation embeddings (w_e / sqrt(sum of the row's w))."""
        behavior, lengths = batch["behavior"].long(), batch["lengths"]
        width = behavior.shape[1]
        valid = torch.arange(width, device=behavior.device)[None, :] < lengths[:, None]
        raw_item, raw_category = batch["item"].long(), batch["category"].long()
        weight = torch.exp(-self.decay * torch.expm1(batch["continuous"][..., 0].float().clamp(0, 50)))
        weight = weight * valid
        has_item, has_category = (raw_item > 0).float(), (raw_category > 0).float()
        user_degree = (weight * (has_item + has_category)).sum(dim=1, keepdim=True).clamp_min(1e-12)
        token_weight = weight.sum(dim=1, keepdim=True).clamp_min(1e-12)
        graph = batch["user_bucket"].long().clamp(0, self.degree.shape[0] - 1)
        item_node = raw_item.clamp(0, self.n_items)
        category_node = raw_category + self.n_items + 1
        n_nodes = self.degree.shape[1]
        degree = self.degree.reshape(-1)
        item_degree = degree[graph[:, None] * n_nodes + item_node]
        category_degree = degree[graph[:, None] * n_nodes + category_node]
        # A node's degree counts this edge too (d_n + w): an edge to a node the graph never saw (a new
        # item, or one outside the sampled users) then weighs sqrt(w / d_u) at most, as any other.
        item_norm = weight * has_item / torch.sqrt((user_degree * (item_degree + weight)).clamp_min(1e-12))
        category_norm = weight * has_category / torch.sqrt((user_degree * (category_degree + weight)).clamp_min(1e-12))
        item, category = hide_ids(raw_item, raw_category, self.id_dropout if self.training else 0.0)
        nodes = self.nodes()  # [G, N, d]
        flat = nodes.reshape(-1, nodes.shape[-1])
        offset = graph[:, None] * n_nodes
        item_vectors = nn.functional.embedding(offset + item.clamp(0, self.n_items), flat)  # [B, L, d]
        category_vectors = nn.functional.embedding(offset + category + self.n_items + 1, flat)
        messages = (item_norm.unsqueeze(-1) * self.relation_item[behavior] * item_vectors
                    + category_norm.unsqueeze(-1) * self.relation_category[behavior] * category_vectors
                    + (weight / torch.sqrt(token_weight)).unsqueeze(-1) * self.relation(behavior))
        return messages.sum(dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tower = self.tower(self.norm(batch["agg"]))
        user = self.user_dropout(self.user(batch)).to(tower.dtype)
        return self.head(self.body(torch.cat([user, tower], dim=-1)))


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class GnnModel(TorchValueModel):
    name: ClassVar[str] = "gnn"
    Params = GnnParams

    def __init__(self, params: GnnParams, spec: FeatureSpec, horizon_days: int) -> None:  # type: ignore[override]
        super().__init__(params, spec, horizon_days)
        self._graphs: list[CutoffGraph] = []
        self._graph_of: dict[Any, int] | None = None  # training only: cutoff -> graph index
        self._fitting: tuple[pd.DataFrame, FeatureTensors] | None = None

    def tensors(self, frame: pd.DataFrame, *, labels: bool) -> FeatureTensors:
        """The deep models' tensors, where a training row's `user_bucket` names the graph of its
        cutoff (0 = the newest, the one every scored row uses: user_buckets is 1)."""
        fitting = self._fitting
        if fitting is not None and labels and fitting[0] is frame:
            return fitting[1]
        data = super().tensors(frame, labels=labels)
        if labels and self._graph_of is not None and "cutoff" in frame.columns:
            index = frame["cutoff"].map(self._graph_of).fillna(0).to_numpy(dtype=np.int64)
            data.user_bucket = torch.from_numpy(index)
        return data

    def fit(self, train: pd.DataFrame, ctx: FitContext) -> dict[str, Any]:
        cutoffs = (sorted(train["cutoff"].dropna().unique(), reverse=True) if "cutoff" in train.columns else [])
        self._graph_of = {cutoff: i for i, cutoff in enumerate(cutoffs)}
        try:
            data = self.tensors(train, labels=True)
            graph_of_row = data.user_bucket.numpy()
            self._graphs = [self.cutoff_graph(data, np.flatnonzero(graph_of_row == graph), seed=ctx.seed + graph)
                            for graph in range(max(len(cutoffs), 1))]
            self._fitting = (train, data)
            summary = super().fit(train, ctx)
        finally:
            self._graph_of, self._fitting = None, None
        summary["graphs"] = len(self._graphs)
        summary["graph_neighbors"] = int((self._graphs[0].weights > 0).sum())
        # Scoring reads the newest cutoff's graph only: the older ones served training.
        self._graphs = self._graphs[:1]
        self.network.keep_graphs(1)  # type: ignore[union-attr]
        return summary

    def cutoff_graph(self, data: FeatureTensors, rows: np.ndarray, *, seed: int) -> CutoffGraph:
        """The graph of the users at `rows` (one cutoff's), at most `graph_users` of them sampled with `seed`."""
        params: GnnParams = self.params  # type: ignore[assignment]
        if rows.size > params.graph_users:
            rows = np.sort(np.random.default_rng(seed).choice(rows, params.graph_users, replace=False))
        index = torch.as_tensor(rows, dtype=torch.int64)
        return build_graph(
            data.behavior[index].numpy(), data.item[index].numpy(), data.category[index].numpy(),
            data.continuous[index, :, 0].numpy(), data.lengths[index].numpy(),
            n_behaviors=len(self.spec.behaviors), item_buckets=self.spec.item_buckets,
            category_buckets=self.spec.category_buckets, half_life_days=params.half_life_days,
            neighbors=params.neighbors)

    def build_network(self, agg_stats: AggregateStats, token_stats: TokenStats,
                      bias: tuple[float, ...]) -> nn.Module:
        if not self._graphs:
            raise RuntimeError("gnn: the graph is built by fit() (or loaded with the model)")
        return GnnNetwork(self.params, len(self.spec.behaviors), self.spec.category_buckets,  # type: ignore[arg-type]
                          self.spec.item_buckets, self._graphs, agg_stats, token_stats, bias, tuple(self.spec.text_columns))

    # the saved model keeps the graph scoring uses (the newest cutoff's), not the older ones
    def _save_state(self, directory: Path) -> None:
        super()._save_state(directory)
        with atomic_path(directory / GRAPH_FILE) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, **self._graphs[0].to_arrays())

    def _load_state(self, directory: Path) -> None:
        path = directory / GRAPH_FILE
        if not path.is_file():
            raise InputError(str(path), "missing graph of a saved gnn model", expected="written by GnnModel.save")
        with np.load(path) as saved:
            self._graphs = [CutoffGraph(saved["neighbors"], saved["weights"], saved["degree"])]
        super()._load_state(directory)
