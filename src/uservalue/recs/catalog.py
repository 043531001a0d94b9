"""The recommender kinds by name (params recs.models)."""

from __future__ import annotations

from typing import Any

from uservalue.recs.base import Recommender
from uservalue.recs.baselines import ItemCooccurrence, Popularity
from uservalue.recs.graph import GraphRecommender
from uservalue.recs.nextitem import NextItem
from uservalue.recs.taste import TasteModel

RECOMMENDERS: dict[str, type[Recommender]] = {m.kind: m for m in (Popularity, ItemCooccurrence, NextItem, TasteModel,
                                                                          GraphRecommender)}


def create_recommender(kind: str, params: dict[str, Any] | None = None) -> Recommender:
    if kind not in RECOMMENDERS:
        raise ValueError(f"unknown recommender {kind!r}; known: {sorted(RECOMMENDERS)}")
    return RECOMMENDERS[kind](**(params or {}))
