"""The recommenders (uservalue.recs): one interface, fitted strictly before a cutoff, saved and loaded to the
same answers; the time-split metrics by hand; and the train_recs stage against a real MLflow (SQLite):
evaluated, the best registered as `user-recs` through the gate."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.conftest import merge
from uservalue.config import RecsParams, SyntheticSource, parse_params
from uservalue.data.sources.synthetic import generate
from uservalue.errors import InputError
from uservalue.lifecycle.context import StageContext
from uservalue.lifecycle.recs_registry import CHALLENGER, CHAMPION, decide_recs, load_recs_version
from uservalue.lifecycle.train_recs import read_events, run_train_recs
from uservalue.recs.base import load_recommender
from uservalue.recs.catalog import RECOMMENDERS, create_recommender
from uservalue.recs.evaluate import (
    evaluate_recommender,
    evaluate_truth,
    ranking_metrics,
    time_split,
)

CUTOFF = dt.datetime(1997, 10, 1, tzinfo=dt.UTC)
HORIZON = 120
FAST = {"popularity": {}, "cooccurrence": {"neighbors": 50},
        "nextitem": {"dim": 16, "epochs": 4, "samples_per_user": 10, "negatives": 300},
        "taste": {"tastes": 8, "gamma": 5, "cooccurrence": 0.5, "neighbors": 50},
        "graph": {"dim": 16, "epochs": 8, "samples_per_user": 5, "batch_size": 2048, "learning_rate": 0.02, "threads": 1}}
TINY = {**FAST, "nextitem": {"dim": 8, "epochs": 1, "samples_per_user": 2, "negatives": 100},
        "graph": {"dim": 8, "epochs": 2, "samples_per_user": 2, "batch_size": 2048, "threads": 1}}
WORLD = SyntheticSource(users=1000, events_per_user=40, seed=11, affinity=0.6, categories=100, items_per_category=40,
                        tastes=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("recs-world")
    generate(WORLD, root / "events.parquet", root / "truth")
    return root / "events.parquet", root / "truth"


@pytest.fixture(scope="module")
def events(world: tuple[Path, Path]) -> pd.DataFrame:
    return pd.read_parquet(world[0])


@pytest.fixture(scope="module")
def fitted(events: pd.DataFrame) -> dict:
    models = {}
    for kind, params in FAST.items():
        model = create_recommender(kind, params)
        model.fit(events, CUTOFF)
        models[kind] = model
    return models


def test_every_kind_is_in_the_catalog_and_config() -> None:
    assert set(RecsParams().models) == {"popularity", "cooccurrence", "nextitem", "taste"}  # the default list
    assert set(RECOMMENDERS) == set(RecsParams().models) | {"graph"}
    with pytest.raises(ValueError, match="unknown recommender"):
        create_recommender("nope")


def test_fit_sees_only_events_before_the_cutoff(events: pd.DataFrame) -> None:
    past = events[events["ts"] < pd.Timestamp(CUTOFF)]
    users = past["user_id"].drop_duplicates().head(30)
    history = past[past["user_id"].isin(users)]
    for kind, params in TINY.items():
        full, again = create_recommender(kind, params), create_recommender(kind, params)
        full.fit(events, CUTOFF)
        again.fit(past, CUTOFF)  # the same model from the past alone: the future changed nothing
        a, b = full.recommend(history, 10), again.recommend(history, 10)
        assert [r.items for r in a] == [r.items for r in b], kind
        assert np.allclose([r.scores for r in a], [r.scores for r in b]), kind
        assert set(full.catalog) == set(past["item_id"].dropna())


def test_recommend_k_items_best_first_without_bought_ones(events: pd.DataFrame, fitted: dict, tmp_path: Path) -> None:
    past = events[events["ts"] < pd.Timestamp(CUTOFF)]
    buyers = past.loc[past["behavior"] == "buy", "user_id"].drop_duplicates().head(20)
    history = past[past["user_id"].isin(buyers)]
    bought = history[history["behavior"] == "buy"].groupby("user_id")["item_id"].apply(set)
    for kind, model in fitted.items():
        recs = model.recommend(history, 15)
        assert [r.user_id for r in recs] == list(dict.fromkeys(history.sort_values(["user_id", "ts"])["user_id"]))
        for r in recs:
            assert len(r.items) == 15 == len(set(r.items)) and r.scores == sorted(r.scores, reverse=True)
            assert not set(r.items) & bought[r.user_id], kind
        with_bought = model.recommend(history, 15, exclude_bought=False)
        if kind != "popularity":  # what a user bought is among what they like
            assert any(set(r.items) & bought[r.user_id] for r in with_bought), kind
        model.save(tmp_path / kind)
        loaded = load_recommender(tmp_path / kind)
        assert type(loaded) is type(model)
        again = loaded.recommend(history, 15)
        assert [r.items for r in again] == [r.items for r in recs]
        assert np.allclose([r.scores for r in again], [r.scores for r in recs], rtol=1e-5)


def test_learned_model_beats_the_baselines_and_nears_the_planted_truth(events: pd.DataFrame, fitted: dict,
                                                                      world: tuple[Path, Path]) -> None:
    split = time_split(events, CUTOFF, HORIZON)
    scores = {kind: evaluate_recommender(model, split) for kind, model in fitted.items()}
    truth = evaluate_truth(str(world[1]), split)
    recall = {kind: s["recall_at_20"] for kind, s in scores.items()}
    assert recall["nextitem"] >= 2 * recall["popularity"], recall
    assert recall["nextitem"] > recall["cooccurrence"], recall
    assert recall["nextitem"] <= truth["recall_at_20"] * 1.1 and truth["recall_at_20"] > 2 * recall["popularity"]
    assert scores["popularity"]["coverage"] < scores["nextitem"]["coverage"]
    # The taste groups (EM over users) carry a user's taste to the favourites they have not met yet.
    assert recall["taste"] > max(recall["cooccurrence"], recall["nextitem"]), recall


def test_graph_recommender_learns_affinities_and_embeds_a_cold_user(events: pd.DataFrame, fitted: dict) -> None:
    """LightGCN over the user-item graph (uservalue.recs.graph): ahead of popularity on the planted affinities,
    and a user unseen in training is embedded from its own events (one step from the item embeddings)."""
    graph = fitted["graph"]
    split = time_split(events, CUTOFF, HORIZON)
    recall = {kind: evaluate_recommender(fitted[kind], split)["recall_at_20"] for kind in ("graph", "popularity")}
    assert recall["graph"] >= 2 * recall["popularity"], recall
    past = events[events["ts"] < pd.Timestamp(CUTOFF)]
    known = past[past["user_id"] == past["user_id"].iloc[0]]
    cold = known.assign(user_id="never-seen")  # the same events under an id the graph never had
    [a], [b] = graph.recommend(known, 20), graph.recommend(cold, 20)
    assert b.user_id == "never-seen" and b.items == a.items and np.allclose(b.scores, a.scores)
    assert b.items[:10] != graph.popular(10)[0]  # personal, not the popular list
    strangers = cold.assign(item_id="not-in-the-catalogue")  # nothing known: the item biases alone
    [c] = graph.recommend(strangers, 5)
    assert len(c.items) == 5 and set(c.items) <= set(graph.catalog)


def test_ranking_metrics_by_hand() -> None:
    truth = {"a": {"x", "y"}, "b": {"z"}, "c": {"w"}}
    lists = {"a": ["x", "q", "y"], "b": ["q", "r"], "c": []}
    m = ranking_metrics(lists, truth, catalog_items=10)
    assert m["recall_at_20"] == pytest.approx((1.0 + 0 + 0) / 3)
    dcg_a = 1 + 1 / np.log2(4)
    assert m["ndcg_at_20"] == pytest.approx((dcg_a / (1 + 1 / np.log2(3))) / 3)
    assert m["hit_rate_at_10"] == pytest.approx(1 / 3)
    assert m["coverage"] == pytest.approx(4 / 10)  # x, q, y, r


def test_time_split_truth_is_after_the_cutoff_without_bought_items(events: pd.DataFrame) -> None:
    split = time_split(events, CUTOFF, HORIZON)
    assert (split.history["ts"] < pd.Timestamp(CUTOFF)).all()
    bought = split.history[split.history["behavior"] == "buy"].groupby("user_id")["item_id"].apply(set)
    assert all(not items & bought.get(user, set()) for user, items in split.truth.items())
    assert set(split.truth) <= set(split.history["user_id"])
    with pytest.raises(InputError, match="item_id"):
        time_split(events.drop(columns="item_id"), CUTOFF, HORIZON)


def test_gate_of_the_recommender() -> None:
    cfg = RecsParams(min_delta=0.01, guards={"ndcg_at_20": 0.02})
    champion = {"recall_at_20": 0.30, "ndcg_at_20": 0.30, "hit_rate_at_10": 0.5, "coverage": 0.1}
    assert decide_recs(champion, None, cfg).promote
    assert decide_recs({**champion, "recall_at_20": 0.32}, champion, cfg).promote
    assert not decide_recs({**champion, "recall_at_20": 0.305}, champion, cfg).promote
    worse = decide_recs({**champion, "recall_at_20": 0.40, "ndcg_at_20": 0.25}, champion, cfg)
    assert not worse.promote and any("guard ndcg_at_20" in r for r in worse.reasons)


@pytest.mark.slow  # the whole train_recs stage
def test_train_recs_stage_registers_the_best_through_the_gate(world: tuple[Path, Path], repo_params: dict,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI, which wins over tracking.uri: an earlier test's
    # store must not be this test's.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    events_path, truth_dir = world
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def stage(models: dict) -> dict:
        ctx = StageContext(tmp_path, parse_params(merge(repo_params, {
            "split.eval_cutoff": CUTOFF.date().isoformat(), "split.horizon_days": HORIZON,
            "split.train_cutoffs": ["1997-07-01"],
            "recs.models": models, "recs.max_eval_users": 300, "tracking.uri": uri,
            "tracking.artifact_location": (tmp_path / "artifacts").as_uri(), "train.device": "cpu"})))
        return run_train_recs(ctx, events_path, truth_dir, tmp_path / "models", tmp_path / "recs_metrics.json",
                              tmp_path / "recs.md", tmp_path / "recs_registry.json")

    first = stage({"popularity": {}})
    assert first["registry"]["decision"]["alias"] == CHAMPION and first["report"]["champion"] == "popularity"
    second = stage(TINY | {"nextitem": FAST["nextitem"]})
    report = json.loads((tmp_path / "recs_metrics.json").read_text())
    best = max(report["models"], key=lambda kind: report["models"][kind]["recall_at_20"])
    assert report["champion"] == best != "popularity" and set(report["models"]) == set(FAST)
    assert report["planted_truth"]["recall_at_20"] > report["models"]["popularity"]["recall_at_20"]
    assert second["registry"]["decision"]["alias"] == CHAMPION, second["registry"]["decision"]["reasons"]
    assert second["registry"]["previous_champion"]["version"] == first["registry"]["candidate"]["version"]
    assert "| nextitem |" in (tmp_path / "recs.md").read_text()
    assert report["ratios"]["recall_at_20 champion / popularity"] > 2
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("user-recs", CHAMPION)
    assert champion.tags["model"] == best
    run = client.get_run(champion.run_id)
    assert run.data.metrics["recall_at_20"] == pytest.approx(report["models"][best]["recall_at_20"])
    served = load_recs_version("user-recs", champion.version)
    assert served.kind == best
    # The popularity model again: worse than the champion, so it only becomes the challenger.
    third = stage({"popularity": {}})
    assert third["registry"]["decision"]["alias"] == CHALLENGER
    assert client.get_model_version_by_alias("user-recs", CHAMPION).version == champion.version


def test_max_train_users_reads_whole_users_of_a_seeded_sample(world: tuple[Path, Path]) -> None:
    """recs.max_train_users (issue 13: the stage's memory on a big log): the events of a sample of whole users,
    filtered while the file is scanned, the same sample for the same seed; no sampling when the users fit."""
    events_path, _ = world
    until = pd.Timestamp(CUTOFF) + pd.Timedelta(days=HORIZON)
    everything = read_events(events_path, until)
    sampled = read_events(events_path, until, max_users=100, seed=3)
    users = set(sampled["user_id"])
    assert len(users) == 100 and users < set(everything["user_id"])
    pd.testing.assert_frame_equal(sampled.reset_index(drop=True),  # every event of each sampled user, in file order
                                  everything[everything["user_id"].isin(users)].reset_index(drop=True))
    pd.testing.assert_frame_equal(read_events(events_path, until, max_users=100, seed=3), sampled)
    assert set(read_events(events_path, until, max_users=100, seed=4)["user_id"]) != users
    pd.testing.assert_frame_equal(read_events(events_path, until, max_users=10**6, seed=3), everything)


def test_gru_encoder_fits_saves_and_loads(events: pd.DataFrame, tmp_path: Path) -> None:
    model = create_recommender("nextitem", {"encoder": "gru", "dim": 16, "epochs": 1, "samples_per_user": 2,
                                            "sequence_length": 10, "negatives": 200})
    summary = model.fit(events, CUTOFF)
    assert summary["train_examples"] > 0 and np.isfinite(summary["final_loss"])
    history = events[(events["ts"] < pd.Timestamp(CUTOFF))].head(200)
    model.save(tmp_path / "gru")
    loaded = load_recommender(tmp_path / "gru")
    assert [r.items for r in loaded.recommend(history, 5)] == [r.items for r in model.recommend(history, 5)]
    with pytest.raises(ValueError, match="encoder"):
        create_recommender("nextitem", {"encoder": "lstm"})


def test_a_log_without_items_is_skipped_not_failed(world: tuple[Path, Path], repo_params: dict, tmp_path: Path) -> None:
    """CDNOW has purchases but no item ids: the stage says so in its outputs and registers nothing."""
    no_items = pd.read_parquet(world[0]).assign(item_id=None)
    no_items.to_parquet(tmp_path / "events.parquet")
    ctx = StageContext(tmp_path, parse_params(merge(repo_params, {
        "split.eval_cutoff": CUTOFF.date().isoformat(), "split.horizon_days": HORIZON, "split.train_cutoffs": [],
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})))
    result = run_train_recs(ctx, tmp_path / "events.parquet", None, tmp_path / "models", tmp_path / "m.json",
                            tmp_path / "m.md", tmp_path / "r.json")
    assert "no event has an item_id" in result["report"]["skipped"]
    assert json.loads((tmp_path / "r.json").read_text())["champion_version"] is None
    assert "Skipped" in (tmp_path / "m.md").read_text() and (tmp_path / "models" / "skipped.json").is_file()


def test_taobao_log_runs_through_train_recs(taobao_events: Path, repo_params: dict, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The Taobao UserBehavior log (the generated file, and the real ~43-user sample where
    USERVALUE_SAMPLE_DIR names it) through the stage: the last day of the release is the truth, every model
    is scored and the best registered; no planted truth to compare with."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    models = {"popularity": {}, "cooccurrence": {"neighbors": 50}, "taste": {"tastes": 4, "iterations": 20}}
    ctx = StageContext(tmp_path, parse_params(merge(repo_params, {
        "split.eval_cutoff": "2017-12-02", "split.horizon_days": 1,
        "split.train_cutoffs": [], "recs.models": models, "train.device": "cpu",
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.artifact_location": (tmp_path / "artifacts").as_uri()})))
    result = run_train_recs(ctx, taobao_events, taobao_events.parent / "truth", tmp_path / "models",
                            tmp_path / "recs_metrics.json", tmp_path / "recs.md", tmp_path / "recs_registry.json")
    report = json.loads((tmp_path / "recs_metrics.json").read_text())
    events = pd.read_parquet(taobao_events)
    cutoff = pd.Timestamp("2017-12-02", tz="UTC")
    active = set(events.loc[events["ts"] < cutoff, "user_id"]) & set(
        events.loc[(events["ts"] >= cutoff) & (events["ts"] < cutoff + pd.Timedelta(days=1)), "user_id"])
    assert 0 < report["users"] <= len(active) and report["planted_truth"] is None
    assert set(report["models"]) == set(models) and report["champion"] in models
    for kind, metrics in report["models"].items():
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("recall_at_20", "ndcg_at_20", "hit_rate_at_10", "coverage")), kind
    assert result["registry"]["decision"]["alias"] == CHAMPION
    assert "| taste |" in (tmp_path / "recs.md").read_text()
    loaded = load_recommender(tmp_path / "models" / "taste")
    history = events[events["ts"] < cutoff]
    recs = loaded.recommend(history, 20)
    assert recs and all(set(r.items) <= set(history["item_id"]) for r in recs)
