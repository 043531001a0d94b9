"""Time-split evaluation: a model sees each user's events before the cutoff and is scored against the items
of the user's events in [cutoff, cutoff + horizon) (the truth), without the items the user bought before
the cutoff when those are excluded from the recommendations.

Recall@K is hits / min(|truth|, K) (a user with more than K future items can still reach 1), NDCG@K has
binary relevance, HitRate@K is the share of users with at least one hit, and coverage is the share of the
catalogue that appears in anyone's top K."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from uservalue.recs.base import as_utc, before, check_events
from uservalue.schema import PURCHASE

RECALL_K, NDCG_K, HIT_K = 20, 20, 10
METRIC_KEYS = ("recall_at_20", "ndcg_at_20", "hit_rate_at_10", "coverage")


@dataclass(frozen=True)
class TimeSplit:
    history: pd.DataFrame  # the evaluated users' events before the cutoff
    truth: dict[str, set[str]]  # user -> items of their events in the window (bought-before items removed)
    catalog_items: int  # distinct items before the cutoff
    exclude_bought: bool


def time_split(events: pd.DataFrame, cutoff: dt.datetime, horizon_days: float, *, exclude_bought: bool = True,
               truth_behaviors: Sequence[str] | None = None, max_users: int | None = None,
               seed: int = 0) -> TimeSplit:
    frame = check_events(events)
    cutoff = as_utc(cutoff)
    past = before(frame, cutoff)
    end = pd.Timestamp(cutoff) + pd.Timedelta(days=horizon_days)
    future = frame.loc[(frame["ts"] >= pd.Timestamp(cutoff)) & (frame["ts"] < end)]
    if truth_behaviors:
        future = future.loc[future["behavior"].isin(list(truth_behaviors))]
    future = future.loc[future["user_id"].isin(past["user_id"].unique())]
    pairs = future[["user_id", "item_id"]].astype(str).drop_duplicates()
    if exclude_bought:
        bought = past.loc[past["behavior"] == PURCHASE, ["user_id", "item_id"]].astype(str).drop_duplicates()
        pairs = pairs.merge(bought, how="left", indicator=True)
        pairs = pairs.loc[pairs["_merge"] == "left_only", ["user_id", "item_id"]]
    truth = {str(u): set(g) for u, g in pairs.groupby("user_id", sort=True)["item_id"]}
    users = sorted(truth)
    if max_users is not None and len(users) > max_users:
        users = sorted(np.random.default_rng(seed).choice(users, max_users, replace=False).tolist())
        truth = {u: truth[u] for u in users}
    history = past.loc[past["user_id"].astype(str).isin(set(users))]
    return TimeSplit(history, truth, int(past["item_id"].nunique()), exclude_bought)


def ranking_metrics(recommended: dict[str, list[str]], truth: dict[str, set[str]], catalog_items: int) -> dict[str, float]:
    """The metrics of top lists (user -> items, best first) against the truth; a user without a list has no hits."""
    recall, ndcg, hit = [], [], []
    discounts = 1 / np.log2(np.arange(2, max(RECALL_K, NDCG_K, HIT_K) + 2))
    shown: set[str] = set()
    for user, items in truth.items():
        top = recommended.get(user, [])
        shown.update(top[:RECALL_K])
        hits = np.array([item in items for item in top[:NDCG_K]], dtype=float)
        hits = np.pad(hits, (0, NDCG_K - len(hits)))
        recall.append(hits[:RECALL_K].sum() / min(len(items), RECALL_K))
        ideal = discounts[:min(len(items), NDCG_K)].sum()
        ndcg.append(float((hits * discounts[:NDCG_K]).sum() / ideal))
        hit.append(float(hits[:HIT_K].any()))
    return {"recall_at_20": float(np.mean(recall)) if recall else 0.0,
            "ndcg_at_20": float(np.mean(ndcg)) if ndcg else 0.0,
            "hit_rate_at_10": float(np.mean(hit)) if hit else 0.0,
            "coverage": len(shown) / catalog_items if catalog_items else 0.0,
            "users": float(len(truth))}


def evaluate_lists(recommend: Callable[[pd.DataFrame, int, bool], dict[str, list[str]]], split: TimeSplit) -> dict[str, float]:
    """Metrics of any `recommend(history, k, exclude_bought) -> {user: items}` on the split."""
    lists = recommend(split.history, max(RECALL_K, NDCG_K, HIT_K), split.exclude_bought)
    return ranking_metrics(lists, split.truth, split.catalog_items)


def evaluate_recommender(model: object, split: TimeSplit) -> dict[str, float]:
    """Metrics of a fitted Recommender on the split."""
    def lists(history: pd.DataFrame, k: int, exclude: bool) -> dict[str, list[str]]:
        return {r.user_id: r.items for r in model.recommend(history, k, exclude)}  # type: ignore[attr-defined]

    return evaluate_lists(lists, split)


def evaluate_truth(truth_dir: str, split: TimeSplit) -> dict[str, float]:
    """Metrics of the planted truth's own ranking (synthetic data with affinity): the ceiling to compare with."""
    from uservalue.data.sources.synthetic import affinity_scores

    def lists(history: pd.DataFrame, k: int, exclude: bool) -> dict[str, list[str]]:
        banned: dict[str, set[str]] = {}
        if exclude:
            bought = history.loc[history["behavior"] == PURCHASE]
            banned = {str(u): set(g.astype(str)) for u, g in bought.groupby("user_id")["item_id"]}
        ranked = affinity_scores(truth_dir, sorted(history["user_id"].astype(str).unique()), k, banned)
        return {u: [i for i, _ in items] for u, items in ranked.items()}

    return evaluate_lists(lists, split)
