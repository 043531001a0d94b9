"""The generator: deterministic, and its planted truth is recoverable from the data it writes."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy import stats

from tests.conftest import SMALL_SYNTHETIC
from uservalue.config import SyntheticSource
from uservalue.data.sources.synthetic import expected_value, generate
from uservalue.features.sql import FeatureSpec, build_features

CUTOFF = dt.datetime(1997, 10, 1, tzinfo=dt.UTC)


def test_same_seed_same_data_whatever_the_chunk_size(tmp_path: Path, small_synthetic) -> None:
    events, truth = small_synthetic
    rechunked = SMALL_SYNTHETIC.model_copy(update={"chunk_events": 10_000})
    generate(rechunked, tmp_path / "e.parquet", tmp_path / "t")
    assert pq.read_table(events).equals(pq.read_table(tmp_path / "e.parquet"))
    assert pd.read_parquet(truth / "users.parquet").equals(pd.read_parquet(tmp_path / "t" / "users.parquet"))
    assert pq.ParquetFile(tmp_path / "e.parquet").metadata.num_row_groups > 1  # it really was chunked

    other = SMALL_SYNTHETIC.model_copy(update={"seed": SMALL_SYNTHETIC.seed + 1, "users": 200})
    generate(other, tmp_path / "o.parquet", tmp_path / "ot")
    first = pq.read_table(events).slice(0, 100).column("ts")
    assert not first.equals(pq.read_table(tmp_path / "o.parquet").slice(0, 100).column("ts"))


def test_log_looks_like_taobao(small_synthetic) -> None:
    events, truth = small_synthetic
    frame = pd.read_parquet(events)
    # A user whose planted lifetime is very short may have no event at all; the truth lists everyone.
    assert 0.9 * SMALL_SYNTHETIC.users < frame["user_id"].nunique() <= SMALL_SYNTHETIC.users
    assert len(pd.read_parquet(truth / "users.parquet")) == SMALL_SYNTHETIC.users
    keys = list(zip(frame["user_id"], frame["ts"], strict=True))
    assert keys == sorted(keys)
    shares = frame["behavior"].value_counts(normalize=True)
    assert shares["view"] > 0.8 and 0.005 < shares["buy"] < 0.05
    assert (frame.loc[frame["behavior"] != "buy", "amount"] == 0).all()
    assert (frame.loc[frame["behavior"] == "buy", "amount"] > 0).all()
    assert frame["ts"].min() >= pd.Timestamp("1997-01-01", tz="UTC")
    assert frame["ts"].max() < pd.Timestamp("1997-01-01", tz="UTC") + pd.Timedelta(days=SMALL_SYNTHETIC.days)
    meta = json.loads((truth / "truth.json").read_text())
    assert meta["planted"] and meta["events"] == len(frame)


def test_planted_influence_is_recovered_by_regression(small_synthetic) -> None:
    """buys_u = sum_b Binomial(count_u,b, influence_b): least squares over users recovers influence."""
    events, truth = small_synthetic
    frame = pd.read_parquet(events, columns=["user_id", "behavior"])
    counts = pd.crosstab(frame["user_id"], frame["behavior"])
    kinds = list(SMALL_SYNTHETIC.influence)
    coefficients, *_ = np.linalg.lstsq(counts[kinds].to_numpy(float), counts["buy"].to_numpy(float), rcond=None)
    for kind, estimate in zip(kinds, coefficients, strict=True):
        planted = SMALL_SYNTHETIC.influence[kind]
        # A few purchases fall after the user's end and are dropped, so estimates sit slightly low.
        assert abs(estimate - planted) < 0.25 * planted, (kind, estimate, planted)
    assert json.loads((truth / "truth.json").read_text())["influence"] == SMALL_SYNTHETIC.influence


def test_true_expected_value_predicts_the_realized_value(small_synthetic) -> None:
    events, truth = small_synthetic
    features = build_features(
        events, CUTOFF, FeatureSpec(), label_end=CUTOFF + dt.timedelta(days=273)
    ).to_pandas()
    oracle = expected_value(truth, CUTOFF, 273).merge(features[["user_id", "value", "n_purchases"]])
    assert stats.spearmanr(oracle["expected_value"], oracle["value"]).statistic > 0.6
    # Calibrated in total, not only in rank: planted expectations add up to what happened.
    assert oracle["expected_buys"].sum() == pytest.approx(oracle["n_purchases"].sum(), rel=0.1)


def test_drift_shifts_behaviour_mix_and_spend(tmp_path: Path) -> None:
    base = SyntheticSource(users=1500, events_per_user=40, seed=3)
    generate(base, tmp_path / "ref.parquet", tmp_path / "rt")
    generate(base.model_copy(update={"drift": 1.0}), tmp_path / "cur.parquet", tmp_path / "ct")
    reference, current = pd.read_parquet(tmp_path / "ref.parquet"), pd.read_parquet(tmp_path / "cur.parquet")
    share = lambda f, b: (f["behavior"] == b).mean()
    assert share(current, "view") > share(reference, "view") + 0.03
    assert share(current, "cart") < 0.75 * share(reference, "cart")
    spend = lambda f: f.loc[f["behavior"] == "buy", "amount"].mean()
    assert spend(current) > 1.5 * spend(reference)


def test_affinity_changes_only_which_items_and_is_planted_in_the_truth(tmp_path: Path, small_synthetic) -> None:
    """affinity 0 is the log of earlier versions; with affinity, users of one taste share favourite items."""
    events, _ = small_synthetic
    liked = SMALL_SYNTHETIC.model_copy(update={"affinity": 0.6})
    generate(liked, tmp_path / "a.parquet", tmp_path / "at")
    plain, with_affinity = pd.read_parquet(events), pd.read_parquet(tmp_path / "a.parquet")
    same = ["user_id", "ts", "behavior", "category_id", "amount"]
    assert plain[same].equals(with_affinity[same])
    assert (plain["item_id"] != with_affinity["item_id"]).mean() > 0.3
    # An item stays in its category.
    items_per_category = SMALL_SYNTHETIC.items_per_category
    assert (with_affinity["item_id"].astype(int) // items_per_category == with_affinity["category_id"].astype(int)).all()

    users = pd.read_parquet(tmp_path / "at" / "users.parquet")
    favorites = pd.read_parquet(tmp_path / "at" / "favorites.parquet")
    assert {"taste", "category_0", "category_1", "category_2"} <= set(users.columns)
    favorite_items = set(zip(favorites["taste"],
                             favorites["category_id"] * items_per_category + favorites["item_rank"], strict=True))
    joined = with_affinity.merge(users[["user_id", "taste"]])
    on_favorite = np.fromiter(((t, int(i)) in favorite_items for t, i in zip(joined["taste"], joined["item_id"],
                                                                            strict=True)), bool, len(joined))
    # 60% drawn from the favourites, plus the popularity draws that land on one by chance.
    assert 0.58 < on_favorite.mean() < 0.7
    meta = json.loads((tmp_path / "at" / "truth.json").read_text())
    assert meta["affinity"]["strength"] == 0.6 and meta["affinity"]["tastes"] == liked.tastes


def test_affinity_scores_rank_the_planted_favourites_first(tmp_path: Path) -> None:
    from uservalue.data.sources.synthetic import affinity_scores

    cfg = SyntheticSource(users=50, events_per_user=20, seed=5, affinity=0.8, categories=40, items_per_category=30)
    generate(cfg, tmp_path / "e.parquet", tmp_path / "t")
    users = pd.read_parquet(tmp_path / "t" / "users.parquet").set_index("user_id")
    favorites = pd.read_parquet(tmp_path / "t" / "favorites.parquet")
    user = users.index[0]
    row = users.loc[user]
    top = affinity_scores(tmp_path / "t", [user, "nobody"], 5)
    assert list(top) == [user]
    mine = favorites[(favorites["taste"] == row["taste"]) & (favorites["category_id"] == row["category_0"])]
    expected = {str(int(row["category_0"]) * cfg.items_per_category + r) for r in mine["item_rank"]}
    assert {item for item, _ in top[user]} == expected  # the first category's favourites carry 0.6 * 0.8 / 5 each
    scores = [p for _, p in affinity_scores(tmp_path / "t", [user], 1000)[user]]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0)
    banned = next(iter(expected))
    assert banned not in {i for i, _ in affinity_scores(tmp_path / "t", [user], 5, {user: {banned}})[user]}
    with pytest.raises(ValueError, match="without affinity"):
        generate(SyntheticSource(users=10, events_per_user=5), tmp_path / "p.parquet", tmp_path / "p")
        affinity_scores(tmp_path / "p", ["u0"], 5)
