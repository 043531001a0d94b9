"""The graph value model ("gnn"): its cutoff graph against a dense reference, training and
persistence on a small synthetic log, new users scored through the service's path, and the planted
behaviour influence recovered."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from uservalue.features.online import event_columns, online_arrays
from uservalue.models import influence as influence_lib
from uservalue.models.base import PREDICTION_COLUMNS, FitContext
from uservalue.models.catalog import create_model, load_model
from uservalue.models.deep.gnn import GRAPH_FILE, build_graph, edge_weights

# Small enough to train in seconds, enough epochs to learn the planted influence.
QUICK = {"max_epochs": 8, "embedding_dim": 16, "neighbors": 8, "tower": 32, "hidden": [32]}


# -- the graph ------------------------------------------------------------------------------------
def _random_sequences(rng: np.random.Generator, users: int, width: int, items: int, categories: int,
                      behaviors: int) -> tuple[np.ndarray, ...]:
    lengths = rng.integers(0, width + 1, users)
    valid = np.arange(width)[None, :] < lengths[:, None]
    behavior = np.where(valid, rng.integers(1, behaviors + 1, (users, width)), 0).astype(np.uint8)
    item = np.where(valid, rng.integers(0, items + 1, (users, width)), 0).astype(np.int32)  # 0: no item
    category = np.where(valid, rng.integers(1, categories + 1, (users, width)), 0).astype(np.int32)
    log_age = np.where(valid, np.log1p(rng.uniform(0, 90, (users, width))), 0).astype(np.float32)
    return behavior, item, category, log_age, lengths


def _dense_two_hop(behavior, item, category, log_age, lengths, *, items: int, categories: int, behaviors: int,
                   half_life: float) -> tuple[np.ndarray, np.ndarray]:
    """Â_rᵀÂ per behaviour and the node degrees, from the definition, one event at a time."""
    n_nodes = items + categories + 2
    per_relation = np.zeros((behaviors, behavior.shape[0], n_nodes))
    for u in range(behavior.shape[0]):
        for t in range(lengths[u]):
            w = 2.0 ** (-np.expm1(float(log_age[u, t])) / half_life)
            if item[u, t] > 0:
                per_relation[behavior[u, t] - 1, u, item[u, t]] += w
            per_relation[behavior[u, t] - 1, u, items + 1 + category[u, t]] += w
    adjacency = per_relation.sum(axis=0)
    d_user, d_node = adjacency.sum(axis=1), adjacency.sum(axis=0)
    scale = np.outer(1 / np.sqrt(np.maximum(d_user, 1e-12)), 1 / np.sqrt(np.maximum(d_node, 1e-12)))
    normalised = per_relation * scale
    return np.einsum("run,um->rnm", normalised, adjacency * scale), d_node


def test_cutoff_graph_equals_the_dense_definition() -> None:
    """Each node's kept two-hop neighbours through each behaviour are the heaviest entries of
    Â_rᵀÂ (node -r- user - node, LightGCN's normalisation, recency-weighted edges)."""
    rng = np.random.default_rng(3)
    items, categories, behaviors, half_life = 12, 4, 3, 30.0
    arrays = _random_sequences(rng, users=40, width=6, items=items, categories=categories, behaviors=behaviors)
    dense, degree = _dense_two_hop(*arrays, items=items, categories=categories, behaviors=behaviors,
                                   half_life=half_life)
    n_nodes = items + categories + 2
    full = build_graph(*arrays, n_behaviors=behaviors, item_buckets=items, category_buckets=categories,
                       half_life_days=half_life, neighbors=n_nodes)
    np.testing.assert_allclose(full.degree, degree, rtol=1e-5)
    rebuilt = np.zeros_like(dense)
    for r in range(behaviors):
        for n in range(n_nodes):
            np.add.at(rebuilt[r, n], full.neighbors[r, n], full.weights[r, n])
    np.testing.assert_allclose(rebuilt, dense, rtol=1e-5, atol=1e-7)
    assert rebuilt[:, 0].sum() == 0 and rebuilt[:, items + 1].sum() == 0  # "no item" / "no category" nodes

    k = 3
    kept = build_graph(*arrays, n_behaviors=behaviors, item_buckets=items, category_buckets=categories,
                       half_life_days=half_life, neighbors=k)
    for r in range(behaviors):
        for n in range(n_nodes):
            heaviest = np.sort(dense[r, n][dense[r, n] > 0])[::-1][:k]
            np.testing.assert_allclose(kept.weights[r, n][: heaviest.size], heaviest, rtol=1e-5)
            assert np.all(kept.weights[r, n][heaviest.size:] == 0)


def test_edge_weight_halves_every_half_life() -> None:
    days = np.array([0.0, 30.0, 60.0])
    np.testing.assert_allclose(edge_weights(np.log1p(days), 30.0), [1.0, 0.5, 0.25])


# -- the model -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gnn(synthetic_features):
    model = create_model("gnn", QUICK, synthetic_features.spec, synthetic_features.horizon_days)
    summary = model.fit(synthetic_features.train, FitContext(seed=0, device="cpu"))
    return model, summary


def test_fit_predict_save_load(gnn, synthetic_features, tmp_path: Path) -> None:
    model, summary = gnn
    assert summary["epochs_run"] >= 1 and np.isfinite(summary["best_valid_loss"])
    assert summary["graphs"] == synthetic_features.train["cutoff"].nunique() == 2  # one graph per cutoff
    assert summary["graph_neighbors"] > 0
    evaluation = synthetic_features.eval
    predicted = model.predict(evaluation)
    assert tuple(predicted.columns) == PREDICTION_COLUMNS
    assert predicted["user_id"].tolist() == evaluation["user_id"].astype(str).tolist()
    assert predicted["p_buy"].between(0, 1).all()
    assert np.isfinite(predicted["expected_value"]).all() and (predicted["expected_value"] >= 0).all()
    assert predicted["expected_value"].nunique() > 100

    model.save(tmp_path / "gnn")
    assert (tmp_path / "gnn" / GRAPH_FILE).is_file()
    loaded = load_model(tmp_path / "gnn")
    assert type(loaded) is type(model) and loaded.params == model.params
    pd.testing.assert_frame_equal(loaded.predict(evaluation), predicted)


def _events_of(events: pd.DataFrame, user: str, new_id: str) -> pd.DataFrame:
    return events[events["user_id"] == user].assign(user_id=new_id)


def test_new_user_is_scored_from_its_own_history(gnn, synthetic_features, small_synthetic) -> None:
    """A user the model never saw is embedded by one propagation step from the trained item and
    category embeddings: through predict_arrays (the service's path) its prediction is finite, the
    batch path's, and depends on which items its events touched, not only on the aggregates."""
    model, _ = gnn
    spec = synthetic_features.spec
    events = pd.read_parquet(small_synthetic[0])
    cutoff = dt.datetime.fromisoformat(synthetic_features.meta["splits"]["eval"][0]["cutoff"])
    events = events[events["ts"] < pd.Timestamp(cutoff)]
    counts = events.groupby("user_id").size()
    user = str(counts[counts.between(30, 50)].index[0])
    own = _events_of(events, user, "never-seen-user")
    # The same events on other (popular) items and categories: the same aggregates, other graph nodes.
    popular_items = [i for i in events["item_id"].value_counts().index if i not in set(own["item_id"])]
    popular_categories = [c for c in events["category_id"].value_counts().index if c not in set(own["category_id"])]
    item_map = dict(zip(sorted(own["item_id"].dropna().unique()), popular_items, strict=False))
    category_map = dict(zip(sorted(own["category_id"].dropna().unique()), popular_categories, strict=False))
    moved = own.assign(user_id="never-seen-user-2", item_id=own["item_id"].map(item_map),
                       category_id=own["category_id"].map(category_map))
    arrays = online_arrays(event_columns(pd.concat([own, moved], ignore_index=True)), cutoff, spec)
    assert sorted(arrays.user_id.tolist()) == ["never-seen-user", "never-seen-user-2"]
    for column in spec.aggregate_columns():  # nothing but the items and categories differ
        np.testing.assert_array_equal(arrays.aggregates[column][0], arrays.aggregates[column][1])
    fast = model.predict_arrays(arrays)
    assert np.isfinite(fast.expected_value).all() and np.isfinite(fast.p_buy).all()
    assert (fast.expected_value > 0).all()
    assert abs(fast.expected_value[0] - fast.expected_value[1]) > 1e-6 * fast.expected_value[0]
    batch = model.predict(arrays.to_pandas())
    np.testing.assert_allclose(fast.expected_value, batch["expected_value"], rtol=1e-5)
    # One user alone gets the numbers it gets among others: nothing is shared between rows (up to
    # float32 rounding: a row's padding width, and with it the summation order, depends on the batch).
    alone = model.predict_arrays(arrays.take(np.array([1])))
    np.testing.assert_allclose(alone.expected_value, fast.expected_value[1:], rtol=1e-5)
    # Items no training user touched (nodes of degree 0 in the graph) weigh like any other edge.
    unknown = own.assign(user_id="new-items-user", item_id=[f"never-sold-{i}" for i in range(len(own))])
    fresh = model.predict_arrays(online_arrays(event_columns(unknown), cutoff, spec))
    assert np.isfinite(fresh.expected_value).all()
    assert fresh.expected_value[0] < 10 * model.predict(synthetic_features.eval)["expected_value"].max()
    # A single event is a history too.
    empty = own.iloc[:1].assign(user_id="one-event-user")
    single = model.predict_arrays(online_arrays(event_columns(empty), cutoff, spec))
    assert np.isfinite(single.expected_value).all()


def test_influence_recovers_the_planted_ranking(gnn, synthetic_features) -> None:
    """Planted: one cart leads to 0.2 purchases, one fav to 0.04, one view to 0.004; the shared
    influence definition (models.influence) read through the gnn's predictions recovers the order."""
    model, _ = gnn
    spec = synthetic_features.spec
    rows = influence_lib.sample_rows(len(synthetic_features.eval), 600, seed=0)
    tables = influence_lib.influence_tables(
        model, influence_lib.arrays_from_frame(synthetic_features.eval.iloc[rows], spec),
        influence_lib.seen_behaviors(synthetic_features.train, spec.behaviors))
    effect = {b: tables.effect[b]["mean"] for b in ("view", "fav", "cart")}
    assert effect["cart"] > effect["fav"] > effect["view"], effect
    assert sum(tables.share.values()) == pytest.approx(1.0)
    # Leaving a behaviour's edges out of the users' graph moves the prediction (per user shares).
    shares = model.attribute(synthetic_features.eval.head(200))
    np.testing.assert_allclose(shares[list(spec.behaviors)].sum(axis=1), 1.0)


def test_torch_sparse_operator_equals_scipys() -> None:
    """The propagation's sparse product runs through scipy on the CPU and torch CSR on CUDA: both
    give the same values and gradients (the torch kind checked here on the CPU)."""
    import warnings

    import torch

    from uservalue.models.deep.gnn import SparseMatmul, SparseOperator

    generator = torch.Generator().manual_seed(0)
    n = 40
    target, source = torch.randint(0, n, (200,), generator=generator), torch.randint(0, n, (200,), generator=generator)
    weight = torch.rand(200, generator=generator)
    coo = torch.sparse_coo_tensor(torch.stack([target, source]), weight, (n, n), check_invariants=True).coalesce()
    with warnings.catch_warnings():  # torch: "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = SparseOperator(coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr())
    operators = [SparseOperator.of(target, source, weight, n), csr]
    results = []
    for operator in operators:
        dense = torch.randn(n, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        out = SparseMatmul.apply(dense, operator)
        out.pow(2).sum().backward()
        results.append((out.detach(), dense.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][0], coo.to_dense() @ torch.randn(n, 8, generator=torch.Generator().manual_seed(1)))
