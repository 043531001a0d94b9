"""Behaviour influence, defined once (uservalue.models.influence): the counterfactual insertion is the
feature engine on one more event, the Shapley shares add up, and linear, gbdt, mlp, sequence and
gnn recover the planted order of the per-event effect on synthetic logs with three different planted
orders (views the most frequent behaviour throughout: weakest, strongest, in the middle)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import merge
from uservalue.config import FeaturizeParams, SplitParams, SyntheticSource, parse_params
from uservalue.data.sources.synthetic import generate
from uservalue.features.online import concat, event_columns, events_to_columns, online_arrays
from uservalue.features.sql import FeatureSpec
from uservalue.features.store import write_feature_sets
from uservalue.lifecycle.influence_report import drifted_mix, influence_markdown, truth_tables
from uservalue.models import influence
from uservalue.models.base import FitContext
from uservalue.models.catalog import create_model, model_class

BEHAVIORS = ("view", "fav", "cart", "buy")


# -- the counterfactual row is the feature engine's ---------------------------------------------
def _random_events(seed: int, n: int = 600, users: int = 80):
    rng = np.random.default_rng(seed)
    cutoff = dt.datetime(2020, 3, 1, tzinfo=dt.UTC)
    cutoff_us = int(cutoff.timestamp() * 1_000_000)
    behavior = rng.choice(list(BEHAVIORS), n)
    events = events_to_columns(
        user_id=[f"u{i}" for i in rng.integers(0, users, n)],
        ts_micros=cutoff_us - rng.integers(2, 300 * 86_400, n) * 1_000_000 - rng.integers(0, 999_999, n),
        behavior=behavior,
        item_id=[None if rng.random() < 0.1 else f"i{rng.integers(0, 40)}" for _ in range(n)],
        category_id=[None if rng.random() < 0.1 else f"c{rng.integers(0, 6)}" for _ in range(n)],
        amount=np.where(behavior == "buy", rng.uniform(1, 80, n).round(2), 0.0),
    )
    return events, cutoff, cutoff_us


@pytest.mark.parametrize("sequence_length", [1, 6, 50])
def test_insert_event_is_the_feature_engine_with_one_more_event(sequence_length: int) -> None:
    events, cutoff, cutoff_us = _random_events(sequence_length)
    spec = FeatureSpec(behaviors=BEHAVIORS, sequence_length=sequence_length)
    rows = online_arrays(events, cutoff, spec)
    last = {}  # each user's last event in the engine's order (latest time; the random times never tie)
    for k in np.argsort(events.t, kind="stable"):
        last[events.user_id[k]] = k
    at = [last[u] for u in rows.user_id]
    for behavior in ("view", "fav", "cart"):
        added = events_to_columns(rows.user_id.tolist(), [cutoff_us - 1_000_000] * len(rows), [behavior] * len(rows),
                                  events.item_id[at].tolist(), events.category_id[at].tolist(), [0.0] * len(rows))
        expected = online_arrays(concat([events, added]), cutoff, spec)
        got = influence.insert_event(rows, behavior)
        for column in spec.aggregate_columns():
            np.testing.assert_allclose(got.aggregates[column], expected.aggregates[column], rtol=1e-12, atol=1e-9,
                                       err_msg=f"{behavior}: {column}")
        np.testing.assert_array_equal(got.offsets, expected.offsets)
        for column, values in expected.sequences.items():
            np.testing.assert_array_equal(got.sequences[column], values, err_msg=f"{behavior}: {column}")
    with pytest.raises(ValueError, match="buy"):
        influence.insert_event(rows, "buy")


def test_remove_behaviors_occludes_only_that_behaviour() -> None:
    events, cutoff, _ = _random_events(3)
    spec = FeatureSpec(behaviors=BEHAVIORS, sequence_length=8)
    rows = online_arrays(events, cutoff, spec)
    gone = influence.remove_behaviors(rows, ["cart", "buy"])
    for column in ("cart_count", "cart_count_30d", "monetary_sum", "purchase_days", "btyd_frequency"):
        assert (gone.aggregates[column] == 0).all(), column
    np.testing.assert_array_equal(gone.aggregates["cart_recency_days"], rows.aggregates["tenure_days"])
    np.testing.assert_array_equal(gone.aggregates["view_count"], rows.aggregates["view_count"])
    np.testing.assert_array_equal(gone.aggregates["n_events"], rows.aggregates["n_events"]
                                  - rows.aggregates["cart_count"] - rows.aggregates["buy_count"])
    assert not np.isin(gone.sequences["seq_behavior"], [3, 4]).any()
    kept = ~np.isin(rows.sequences["seq_behavior"], [3, 4])
    np.testing.assert_array_equal(gone.sequences["seq_item"], rows.sequences["seq_item"][kept])
    # A behaviour no user did: removing it changes nothing (its columns already say "never").
    never = online_arrays(events.take(events.behavior != "fav"), cutoff, spec)
    same = influence.remove_behaviors(never, ["fav"])
    for column, values in never.aggregates.items():
        np.testing.assert_array_equal(same.aggregates[column], values, err_msg=column)


def test_coalition_rows_stack_the_occluded_copies() -> None:
    """The Shapley coalitions, built in one pass per column, are remove_behaviors of each coalition's
    left-out behaviours, stacked in coalition order."""
    from uservalue.features.online import FeatureArrays

    events, cutoff, _ = _random_events(4)
    spec = FeatureSpec(behaviors=BEHAVIORS, sequence_length=7)
    rows = online_arrays(events, cutoff, spec)
    coalitions = influence._coalitions(len(BEHAVIORS))
    expected = FeatureArrays.concat([influence.remove_behaviors(rows, [b for i, b in enumerate(BEHAVIORS) if i not in kept])
                                     for kept in coalitions])
    assert influence.coalition_rows(rows, coalitions).to_arrow().equals(expected.to_arrow())


def test_arrays_from_frame_round_trips_the_engine_rows() -> None:
    events, cutoff, _ = _random_events(5)
    spec = FeatureSpec(behaviors=BEHAVIORS, sequence_length=8)
    rows = online_arrays(events, cutoff, spec)
    back = influence.arrays_from_frame(rows.to_pandas(), spec)
    assert back.to_arrow().equals(rows.to_arrow())


# -- the planted truth ---------------------------------------------------------------------------
def test_planted_truth_is_a_pure_function_of_influence_and_mix() -> None:
    truth = influence.planted_truth({"view": 0.01, "fav": 0.1, "cart": 0.5}, {"view": 0.6, "fav": 0.1, "cart": 0.3},
                                    BEHAVIORS)
    assert truth["effect"] == {"view": 0.01, "fav": 0.1, "cart": 0.5}
    caused = {"view": 0.006, "fav": 0.01, "cart": 0.15}
    for b, value in caused.items():
        assert truth["share"][b] == pytest.approx(value / sum(caused.values()))
    assert truth["share"]["buy"] == 0.0


def test_report_truth_uses_the_generators_drifted_mix(tmp_path: Path, repo_params) -> None:
    cfg = SyntheticSource(users=30, events_per_user=5, drift=0.5)
    generate(cfg, tmp_path / "events.parquet", tmp_path / "truth")
    written = json.loads((tmp_path / "truth" / "truth.json").read_text())
    assert drifted_mix(cfg) == pytest.approx(written["behavior_mix"])
    params = parse_params(merge(repo_params, {"data.source": "synthetic", "data.synthetic.drift": 0.5,
                                               "data.synthetic.users": 30}))
    truth = truth_tables(params)
    assert truth is not None and truth["effect"] == written["influence"]
    assert truth_tables(parse_params(merge(repo_params, {"data.source": "cdnow"}))) is None


# -- the definition on fitted models -------------------------------------------------------------
@pytest.fixture(scope="module")
def linear_synthetic(synthetic_features):
    model = create_model("linear", {}, synthetic_features.spec, synthetic_features.horizon_days)
    model.fit(synthetic_features.train, FitContext(seed=0))
    return model


def test_shapley_shares_add_up_and_ignore_absent_behaviours(synthetic_features, linear_synthetic) -> None:
    spec = synthetic_features.spec
    model = linear_synthetic
    rows = influence.arrays_from_frame(synthetic_features.eval.head(300), spec)
    phi, baseline, _p_buy, value = influence.shapley_values(model, rows)
    np.testing.assert_allclose(phi.sum(axis=1), value - baseline, rtol=1e-9, atol=1e-9)  # efficiency
    np.testing.assert_allclose(value, model.predict(synthetic_features.eval.head(300))["expected_value"], rtol=1e-9)
    counts = influence.event_counts(rows)
    assert (phi[counts == 0] == 0).all()  # a behaviour the user never did moves nothing
    shares = model.predict_arrays(rows).influence
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    assert ((shares >= 0) & (shares <= 1)).all()


def test_shapley_values_score_each_row_once_per_coalition_of_its_own_players(synthetic_features,
                                                                            linear_synthetic) -> None:
    """A behaviour a user never did (a null player: removing it leaves the row as it is) is not scored
    again in every coalition: the values are those of all 2^K coalitions scored in full."""
    from uservalue.features.online import FeatureArrays

    spec = synthetic_features.spec
    full = influence.arrays_from_frame(synthetic_features.eval.head(100), spec)
    rows = FeatureArrays.concat([full, influence.remove_behaviors(full, ["fav"]),
                                 influence.remove_behaviors(full, ["view", "cart"])])
    null = influence.null_players(rows)
    fav, view, cart = (spec.behaviors.index(b) for b in ("fav", "view", "cart"))
    assert null[100:200, fav].all() and null[200:, [view, cart]].all() and not null[200:, fav].all()
    coalitions = influence._coalitions(len(spec.behaviors))
    p_all, v_all = linear_synthetic.predict_outputs(influence.coalition_rows(rows, coalitions))
    values = v_all.reshape(len(coalitions), len(rows))
    expected = (influence._shapley_weights(len(spec.behaviors)) @ values).T
    expected[influence.event_counts(rows) == 0] = 0.0
    phi, baseline, p_buy, value = influence.shapley_values(linear_synthetic, rows)
    np.testing.assert_allclose(phi, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(baseline, values[0], rtol=1e-12)
    np.testing.assert_allclose(value, values[-1], rtol=1e-12)
    np.testing.assert_allclose(p_buy, p_all[-len(rows):], rtol=1e-12)


@pytest.mark.parametrize("rows_wanted", [1, 7, 300])
def test_rows_of_one_behaviour_skip_the_coalitions_and_change_no_number(cdnow_features, rows_wanted: int) -> None:
    """CDNOW's users only buy: predict_with_shares then scores the rows alone, and its numbers are the
    coalition path's (_shapley_values + shares_from_phi) to the bit, shares included."""
    model = create_model("gbdt", {"max_rounds": 40, "early_stopping_rounds": 10}, cdnow_features.spec,
                         cdnow_features.horizon_days)
    model.fit(cdnow_features.train, FitContext(seed=0))
    rows = influence.arrays_from_frame(cdnow_features.eval.head(rows_wanted), cdnow_features.spec)
    counts = influence.event_counts(rows)
    assert ((counts > 0).sum(axis=1) <= 1).all()
    p_buy, value, shares = influence.predict_with_shares(model, rows)
    phi, _baseline, p_full, v_full = influence._shapley_values(model, rows, counts)
    np.testing.assert_array_equal(p_buy, p_full)
    np.testing.assert_array_equal(value, v_full)
    np.testing.assert_array_equal(shares, influence.shares_from_phi(phi, cdnow_features.spec.behaviors, counts))


def test_cdnow_reports_no_effect_for_behaviours_it_never_saw(cdnow_features) -> None:
    model = create_model("linear", {}, cdnow_features.spec, cdnow_features.horizon_days)
    model.fit(cdnow_features.train, FitContext(seed=0))
    seen = influence.seen_behaviors(cdnow_features.train, cdnow_features.spec.behaviors)
    assert seen == {"view": False, "fav": False, "cart": False, "buy": True}
    rows = influence.arrays_from_frame(cdnow_features.eval.head(300), cdnow_features.spec)
    tables = influence.influence_tables(model, rows, seen)
    assert tables.effect == {"view": None, "fav": None, "cart": None}
    assert tables.share == {"view": 0.0, "fav": 0.0, "cart": 0.0, "buy": 1.0}
    text = influence_markdown({"linear": tables.to_dict()}, None, BEHAVIORS)
    assert "| view | - |" in text and "| buy | 1.000 |" in text
    # What "explain": "effect" answers per user: null for a behaviour the model never saw, as the tables.
    model.set_influence(tables)
    assert influence.user_effects(model, rows.take(np.arange(3))) == [{"view": None, "fav": None, "cart": None}] * 3


# -- recovery of planted orders ------------------------------------------------------------------
# Views are the most frequent behaviour in every log; the planted order of the per-event effect
# changes. The planted probabilities are spaced (0.6 / 0.25 / 0) and a purchase follows its event by
# 30 days on average, so that the training labels hold many purchases caused by the last month's
# events: what a model must learn to tell one more event of each behaviour apart.
MIX = {"view": 0.5, "fav": 0.2, "cart": 0.3}
ORDERS = {
    "view-weakest": {"view": 0.0, "fav": 0.25, "cart": 0.6},
    "view-strongest": {"view": 0.6, "fav": 0.25, "cart": 0.0},
    "view-middle": {"view": 0.2, "fav": 0.6, "cart": 0.0},
}
SPLIT = SplitParams(eval_cutoff="1998-01-01", horizon_days=120, train_cutoffs=["1997-09-03", "1997-11-02"])
# Small, fast settings (no user-id embedding: it learns nothing about behaviours).
RECOVERY_MODELS = {
    "linear": {},
    "gbdt": {"max_rounds": 200, "learning_rate": 0.1, "early_stopping_rounds": 20, "num_threads": 2},
    "mlp": {"max_epochs": 8, "patience": 2, "tower": 16, "hidden": [32], "user_buckets": 0, "embedding_dim": 4},
    "sequence": {"max_epochs": 5, "patience": 2, "d_model": 16, "tower": 16, "hidden": [16], "lr": 3e-3},
    # The gnn's default batch (1024) leaves ~6 optimiser steps per epoch on these ~6k training rows:
    # after 8 such epochs its aggregate tower has learnt only "more events, more value", and on
    # log1p-scaled counts one more event of the rarer behaviour (fav) is the larger step, so it ranked
    # fav above view in the view-strongest log. Batches of 512 and a narrower network (the mlp's
    # step count and width) learn the per-behaviour differences in the same 8 epochs.
    "gnn": {"max_epochs": 8, "patience": 2, "batch_size": 512, "embedding_dim": 8, "neighbors": 8, "tower": 16,
            "hidden": [32]},
}


@pytest.fixture(scope="module", params=list(ORDERS))
def planted(request, tmp_path_factory: pytest.TempPathFactory):
    """(planted influence, truth, {model: tables}) for one planted order: a synthetic log of 4,000
    users, featurized by the featurize stage's code, linear, gbdt, mlp, sequence and gnn fitted on it."""
    planted_influence = ORDERS[request.param]
    root = tmp_path_factory.mktemp(f"planted-{request.param}")
    cfg = SyntheticSource(users=4000, events_per_user=40, seed=2, behavior_mix=MIX, influence=planted_influence,
                          categories=50, items_per_category=20, purchase_delay_days=30.0)
    generate(cfg, root / "events.parquet", root / "truth")
    write_feature_sets(root / "events.parquet", SPLIT,
                       FeaturizeParams(sequence_length=10, windows_days=[30], threads=2, memory_limit="2GB"),
                       BEHAVIORS, root / "features")
    import pandas as pd

    train = pd.read_parquet(root / "features" / "train.parquet")
    spec = FeatureSpec.from_dict(json.loads((root / "features" / "meta.json").read_text())["spec"])
    rows = influence.arrays_from_frame(train.iloc[influence.sample_rows(len(train), 1500, 0)], spec)
    seen = influence.seen_behaviors(train, BEHAVIORS)
    tables = {}
    for name, params in RECOVERY_MODELS.items():
        model = create_model(name, params, spec, SPLIT.horizon_days)
        model.fit(train, FitContext(seed=0, device="cpu", checkpoint_dir=root / "ckpt" / name))
        tables[name] = influence.influence_tables(model, rows, seen)
    truth = influence.planted_truth(planted_influence, json.loads((root / "truth" / "truth.json").read_text())
                                    ["behavior_mix"], BEHAVIORS)
    return request.param, truth, tables


@pytest.mark.slow
def test_models_recover_the_planted_effect_order(planted) -> None:
    order, truth, tables = planted
    assert all(model_class(name).behavior_aware for name in tables) and len(tables) == 5
    expected = influence.effect_order(truth["effect"])
    found = {name: influence.effect_order(t.effect) for name, t in tables.items()}
    print(order, "truth", expected, {n: {b: round(v["mean"], 2) for b, v in t.effect.items()} for n, t in tables.items()})
    assert all(found[name] == expected for name in tables), found
    for t in tables.values():  # the interval is the users' spread: a real number, around the mean
        for effect in t.effect.values():
            assert effect["low"] < effect["mean"] < effect["high"]


@pytest.mark.slow
def test_shares_sum_to_one_and_rank_the_planted_extremes(planted) -> None:
    """Shares mix strength and frequency (and the purchase history's own part, which the planted log
    gives none); compared with the truth's shares, every model puts the behaviour that causes the
    most purchases above the one that causes the fewest."""
    order, truth, tables = planted
    planted_shares = {b: s for b, s in truth["share"].items() if b != "buy"}
    top, bottom = max(planted_shares, key=planted_shares.get), min(planted_shares, key=planted_shares.get)
    print(order, "truth", planted_shares, {n: {b: round(s, 3) for b, s in t.share.items()} for n, t in tables.items()})
    for name, t in tables.items():
        assert sum(t.share.values()) == pytest.approx(1.0)
        assert t.share[top] > t.share[bottom], (name, t.share)
    text = influence_markdown({n: t.to_dict() for n, t in tables.items()}, truth, BEHAVIORS)
    assert "| effect | linear | gbdt | mlp | sequence | gnn | truth |" in text.splitlines()


def test_event_columns_of_a_real_log_feed_the_definition(small_synthetic, synthetic_features,
                                                         linear_synthetic) -> None:
    """The service's path: the online engine's rows of stored events give the tables' per-user numbers."""
    events = event_columns(pq.read_table(small_synthetic[0]))
    cutoff = dt.datetime.fromisoformat(synthetic_features.meta["splits"]["eval"][0]["cutoff"])
    users = synthetic_features.eval["user_id"].head(50).to_numpy()
    rows = online_arrays(events.take(np.isin(events.user_id, users)), cutoff, synthetic_features.spec)
    model = linear_synthetic
    d_value, d_p = influence.per_user_effects(model, rows)
    assert d_value.shape == d_p.shape == (len(rows), 3) and np.isfinite(d_value).all()
    one = influence.per_user_effects(model, rows.take(np.array([7])))
    np.testing.assert_allclose(one[0][0], d_value[7])
    # The service's per-user answer ("explain": "effect"): those numbers, per behaviour.
    answers = influence.user_effects(model, rows)
    for k, answer in enumerate(answers):
        for j, b in enumerate(("view", "fav", "cart")):
            assert answer[b] == {"expected_value": d_value[k, j], "p_buy": d_p[k, j]}


def test_influence_command_shows_both_tables_with_the_truth(tmp_path: Path, write_params) -> None:
    """`uservalue influence`: every model's tables (a purchase-only model has none) next to the planted
    truth of a synthetic source; a broken influence.json is named in the error."""
    from typer.testing import CliRunner

    from uservalue.cli.app import app

    params = write_params({"data.source": "synthetic", "train.models": ["historical", "linear", "gbdt"]})
    tables = influence.InfluenceTables(
        effect={"view": {"mean": 0.5, "low": 0.4, "high": 0.6}, "fav": None, "cart": {"mean": 2.0, "low": 1.5, "high": 2.5}},
        effect_p_buy={"view": None, "fav": None, "cart": None},
        share={"view": 0.2, "fav": 0.0, "cart": 0.5, "buy": 0.3}, users=10, seen={})
    for name, content in (("historical", "{}"), ("linear", json.dumps(tables.to_dict())),
                          ("gbdt", json.dumps(tables.to_dict()))):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "influence.json").write_text(content)
    out = tmp_path / "influence.md"
    result = CliRunner().invoke(app, ["influence", "--params", str(params), "--models-dir", str(tmp_path / "models"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert "| effect | linear | gbdt | truth |" in lines and "| share | linear | gbdt | truth |" in lines
    assert "| cart | 2 [1.5, 2.5] | 2 [1.5, 2.5] | 0.2 |" in lines  # the default planted cart: 0.2
    assert "| fav | - | - | 0.04 |" in lines
    (tmp_path / "models" / "gbdt" / "influence.json").write_text("{not json")
    result = CliRunner().invoke(app, ["influence", "--params", str(params), "--models-dir", str(tmp_path / "models")])
    assert result.exit_code != 0 and "gbdt" in result.output and "influence.json" in result.output
