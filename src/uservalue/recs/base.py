"""The one recommender interface: fit on events strictly before a cutoff, `recommend(histories, k,
exclude_bought)` -> item ids and scores per user, save/load a directory (no pickles)."""

from __future__ import annotations

import datetime as dt
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from uservalue.errors import InputError
from uservalue.schema import DEFAULT_BEHAVIORS, PURCHASE

HISTORY_COLUMNS = ("user_id", "ts", "behavior", "item_id")
OPTIONAL_COLUMNS = ("category_id",)  # the item's category, when the log has one
META_FILE = "recommender.json"
CATALOG_FILE = "catalog.npy"
TIE_BREAK = 1e-6  # times the item's normalised popularity: equal scores rank the more popular item first
SCORE_BATCH_USERS = 256  # users scored at once (a dense users x catalogue matrix)


@dataclass(frozen=True)
class FitOptions:
    seed: int = 0
    device: str = "auto"
    log_metrics: Callable[[dict[str, float], int], None] | None = None


@dataclass(frozen=True)
class Recommendation:
    user_id: str
    items: list[str]
    scores: list[float]


@dataclass
class Histories:
    """Users' events, encoded against a catalogue: user i's events are rows offsets[i]:offsets[i+1], in time
    order; `item` is the catalogue index (-1: an item the catalogue does not hold)."""

    users: list[str]
    offsets: np.ndarray
    item: np.ndarray
    behavior: np.ndarray  # index into DEFAULT_BEHAVIORS (-1: another behaviour)
    t: np.ndarray  # epoch seconds
    category: np.ndarray  # index into the recommender's categories (-1: none or unknown)

    def user_slice(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def bought(self, i: int) -> np.ndarray:
        rows = self.user_slice(i)
        items = self.item[rows][self.behavior[rows] == DEFAULT_BEHAVIORS.index(PURCHASE)]
        return np.unique(items[items >= 0])


def check_events(events: pd.DataFrame, source: str = "events") -> pd.DataFrame:
    """The history columns, rows with an item only, sorted by user and time; an InputError naming the column."""
    missing = [c for c in HISTORY_COLUMNS if c not in events.columns]
    if missing:
        raise InputError(source, f"missing column(s) {missing}", column=missing[0], expected=f"columns {list(HISTORY_COLUMNS)}")
    columns = list(HISTORY_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in events.columns]
    frame = events.loc[events["item_id"].notna(), columns]
    return frame.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)


def as_utc(value: dt.datetime) -> dt.datetime:
    """A time without an offset is UTC (the canonical events' zone)."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def before(events: pd.DataFrame, cutoff: dt.datetime) -> pd.DataFrame:
    """Events strictly before `cutoff` (what a model fitted at the cutoff may see)."""
    return events.loc[events["ts"] < pd.Timestamp(as_utc(cutoff))]


def encode(events: pd.DataFrame, index: dict[str, int], categories: dict[str, int] | None = None) -> Histories:
    frame = check_events(events)
    codes, users = pd.factorize(frame["user_id"], sort=False)
    counts = np.bincount(codes, minlength=len(users)) if len(users) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    item = frame["item_id"].astype(str).map(index).fillna(-1).to_numpy(np.int64)
    behavior = frame["behavior"].map({b: i for i, b in enumerate(DEFAULT_BEHAVIORS)}).fillna(-1).to_numpy(np.int64)
    t = frame["ts"].to_numpy("datetime64[us]").astype(np.int64) / 1e6
    if categories and "category_id" in frame.columns:
        category = frame["category_id"].astype(str).map(categories).fillna(-1).to_numpy(np.int64)
    else:
        category = np.full(len(frame), -1, np.int64)
    return Histories([str(u) for u in users], offsets, item, behavior, t, category)


class Recommender(ABC):
    """A top-K recommender over the items seen before its cutoff (its catalogue)."""

    kind: ClassVar[str]

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.catalog = np.zeros(0, dtype=object)
        self.popularity = np.zeros(0, dtype=np.float32)  # normalised event counts (the tie-break)
        self.cutoff: str | None = None
        self.categories = np.zeros(0, dtype=object)  # the category names seen before the cutoff
        self.item_category = np.zeros(0, dtype=np.int64)  # catalogue item -> its (last seen) category, -1: none

    # -- fit ---------------------------------------------------------------------------------
    def fit(self, events: pd.DataFrame, cutoff: dt.datetime, options: FitOptions | None = None) -> dict[str, float]:
        """Fit on the events strictly before `cutoff`; a summary of the fit."""
        cutoff = as_utc(cutoff)
        train = check_events(before(events, cutoff))
        if train.empty:
            raise InputError("events", f"no event with an item before the cutoff {cutoff.isoformat()}",
                             column="ts", expected="events before the cutoff")
        counts = train["item_id"].astype(str).value_counts(sort=False)
        limit = self.params.get("max_items")
        if limit:
            counts = counts.sort_values(ascending=False, kind="stable").head(int(limit))
        counts = counts.sort_index()
        self.catalog = counts.index.to_numpy(dtype=object)
        self.popularity = (counts.to_numpy(np.float64) / counts.max()).astype(np.float32)
        self.cutoff = cutoff.isoformat()
        if "category_id" in train.columns and train["category_id"].notna().any():
            known = train.loc[train["category_id"].notna()]
            self.categories = np.sort(known["category_id"].astype(str).unique()).astype(object)
            last = known.drop_duplicates("item_id", keep="last").set_index("item_id")["category_id"].astype(str)
            self.item_category = (pd.Series(self.catalog).map(last).map(self.category_index).fillna(-1)
                                  .to_numpy(np.int64))
        else:
            self.categories, self.item_category = np.zeros(0, dtype=object), np.full(len(self.catalog), -1, np.int64)
        histories = encode(train, self.index, self.category_index)
        return {"catalog_items": float(len(self.catalog)), **self._fit(histories, cutoff, options or FitOptions())}

    @property
    def index(self) -> dict[str, int]:
        if getattr(self, "_index", None) is None or len(self._index) != len(self.catalog):
            self._index = {str(item): i for i, item in enumerate(self.catalog)}
        return self._index

    @property
    def category_index(self) -> dict[str, int]:
        return {str(c): i for i, c in enumerate(self.categories)}

    @abstractmethod
    def _fit(self, histories: Histories, cutoff: dt.datetime, options: FitOptions) -> dict[str, float]: ...

    @abstractmethod
    def _score(self, histories: Histories, users: np.ndarray) -> np.ndarray:
        """(len(users), catalogue) scores of the given users (indices into histories.users)."""

    # -- recommend ---------------------------------------------------------------------------
    def recommend(self, histories: pd.DataFrame, k: int = 20, exclude_bought: bool = True) -> list[Recommendation]:
        """The top `k` catalogue items of every user in `histories` (events with HISTORY_COLUMNS; a user's
        whole history, in any order), best first; items the user bought are left out when `exclude_bought`."""
        if k < 1:
            raise ValueError(f"k={k}; expected at least 1")
        encoded = encode(histories, self.index, self.category_index)
        out: list[Recommendation] = []
        n_users, k = len(encoded.users), min(k, len(self.catalog))
        for start in range(0, n_users, SCORE_BATCH_USERS):
            users = np.arange(start, min(start + SCORE_BATCH_USERS, n_users))
            scores = self._score(encoded, users).astype(np.float64) + TIE_BREAK * self.popularity
            if exclude_bought:
                for row, user in enumerate(users):
                    scores[row, encoded.bought(int(user))] = -np.inf
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
                np.tile(np.arange(scores.shape[1]), (len(users), 1))
            for row, user in enumerate(users):
                chosen = top[row][np.argsort(-scores[row, top[row]], kind="stable")]
                chosen = chosen[np.isfinite(scores[row, chosen])]
                out.append(Recommendation(encoded.users[int(user)], [str(i) for i in self.catalog[chosen]],
                                          [float(s) for s in scores[row, chosen]]))
        return out

    def popular(self, k: int) -> tuple[list[str], list[float]]:
        """The `k` items with the most events before the cutoff, and their normalised counts (a user with no
        history: nothing to personalise)."""
        top = np.argsort(-self.popularity, kind="stable")[:k]
        return [str(i) for i in self.catalog[top]], [float(s) for s in self.popularity[top]]

    # -- save / load -------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / CATALOG_FILE, self.catalog.astype(str), allow_pickle=False)
        np.save(path / "popularity.npy", self.popularity, allow_pickle=False)
        np.save(path / "categories.npy", self.categories.astype(str), allow_pickle=False)
        np.save(path / "item_category.npy", self.item_category, allow_pickle=False)
        (path / META_FILE).write_text(json.dumps({"kind": self.kind, "params": self.params, "cutoff": self.cutoff},
                                                 indent=2))
        self._save_state(path)

    def _save_state(self, path: Path) -> None:
        return None

    def _load_state(self, path: Path) -> None:
        return None


def load_recommender(path: str | Path) -> Recommender:
    """A recommender saved by `Recommender.save`."""
    from uservalue.recs.catalog import RECOMMENDERS

    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise InputError(meta_path, "no saved recommender", expected="a directory written by Recommender.save")
    meta = json.loads(meta_path.read_text())
    if meta.get("kind") not in RECOMMENDERS:
        raise InputError(meta_path, f"unknown recommender kind {meta.get('kind')!r}", column="kind",
                         expected=f"one of {sorted(RECOMMENDERS)}")
    model = RECOMMENDERS[meta["kind"]](**meta.get("params", {}))
    model.catalog = np.load(path / CATALOG_FILE, allow_pickle=False).astype(object)
    model.popularity = np.load(path / "popularity.npy", allow_pickle=False)
    model.cutoff = meta.get("cutoff")
    model.categories = np.load(path / "categories.npy", allow_pickle=False).astype(object)
    model.item_category = np.load(path / "item_category.npy", allow_pickle=False)
    model._load_state(path)
    return model
