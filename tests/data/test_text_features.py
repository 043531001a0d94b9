"""Item text in the pipeline and online (issue 23): the featurize stage joins the pooled text columns when
embed_items wrote vectors (and changes nothing when it wrote none), and the service's online features give
the same text columns, by stored id and by sent events, as the batch join. A tiny synthetic log with titles,
embedded once by the real shipped all-MiniLM-L6-v2 on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml

from tests.conftest import REPO_ROOT
from uservalue.config import EmbedItemsParams, FeaturizeParams, SplitParams, SyntheticSource
from uservalue.features.store import read_features, read_meta, write_feature_sets
from uservalue.text.embed import embed_items, read_text_spec, write_empty
from uservalue.text.features import join_text_feature_sets, text_feature_columns

BEHAVIORS = ("view", "fav", "cart", "buy")
SPLIT = {"eval_cutoff": "1998-01-01", "horizon_days": 120, "train_cutoffs": ["1997-09-03", "1997-11-02"]}
TEXT = {"pca_dim": 8, "feature_behaviors": ["view", "cart", "buy"], "feature_last": 5, "feature_dim": 4}


@pytest.fixture(scope="module")
def titled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("titled")
    source = SyntheticSource(users=150, events_per_user=30, seed=3, categories=6, items_per_category=12,
                             titles={"words": 10, "value_words": 2, "words_per_title": 2})
    from uservalue.data.sources.synthetic import generate

    generate(source, tmp / "events.parquet", tmp / "truth")
    embed_items(tmp / "events.parquet", tmp / "item_vectors.parquet",
                EmbedItemsParams(cache_dir=str(tmp / "cache"), device="cpu", **TEXT))
    write_feature_sets(tmp / "events.parquet", SplitParams(**SPLIT), FeaturizeParams(sequence_length=8), BEHAVIORS,
                       tmp / "plain")
    return {"dir": tmp, "events": tmp / "events.parquet", "vectors": tmp / "item_vectors.parquet",
            "plain": tmp / "plain"}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_featurize_stage_joins_the_text_columns_and_leaves_everything_else(titled, tmp_path: Path) -> None:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["split"] = {**params["split"], **SPLIT}
    params["featurize"]["sequence_length"] = 8
    params["data"]["source"] = "synthetic"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "features"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "pipelines" / "featurize.py"), "--params",
                           str(tmp_path / "params.yaml"), "--events", str(titled["events"]), "--out-dir", str(out),
                           "--item-vectors", str(titled["vectors"])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert "text features: 12 columns" in done.stderr, done.stderr
    columns = text_feature_columns(TEXT["feature_behaviors"], TEXT["feature_dim"])
    meta, plain_meta = read_meta(out), read_meta(titled["plain"])
    assert meta.spec.text_columns == tuple(columns)
    assert meta.aggregate_columns == [*plain_meta.aggregate_columns, *columns] and meta.rows == plain_meta.rows
    for name in ("train", "eval"):
        joined, plain = read_features(out, name), read_features(titled["plain"], name)
        pd.testing.assert_frame_equal(joined[list(plain.columns)], plain)  # every other column as it was
        assert (joined[columns].abs().sum(axis=1) > 0).mean() > 0.8  # most users viewed an item with a title
    # The vectors file says which features it is for (featurize and the service read it there).
    assert read_text_spec(titled["vectors"]).last == TEXT["feature_last"]


def test_without_vectors_the_feature_sets_are_left_byte_for_byte(titled, tmp_path: Path) -> None:
    import shutil

    features = tmp_path / "features"
    shutil.copytree(titled["plain"], features)
    before = _files(features)
    empty = tmp_path / "empty.parquet"
    write_empty(empty, 8)
    assert join_text_feature_sets(features, titled["events"], empty) is None
    assert _files(features) == before and read_meta(features).spec.text_columns == ()


def test_online_text_columns_equal_the_batch_join_by_id_and_by_events(titled, tmp_path: Path) -> None:
    """The service's path (serving.scorer.Scorer: stored events by id, or events sent with the request) gives the
    text columns of the batch join, and a model trained on them scores the same by either way."""
    import shutil

    from uservalue.features.online import event_columns
    from uservalue.models.base import FitContext, ModelInfo
    from uservalue.models.catalog import create_model
    from uservalue.serving.requests import Event
    from uservalue.serving.scorer import Scorer
    from uservalue.serving.store import open_store
    from uservalue.text.online import install_item_vectors

    features = tmp_path / "features"
    shutil.copytree(titled["plain"], features)
    join_text_feature_sets(features, titled["events"], titled["vectors"])
    meta = read_meta(features)
    columns = list(meta.spec.text_columns)
    holdout = read_features(features, "eval")
    cutoff = meta.eval_cutoff
    events = pd.read_parquet(titled["events"])
    users = sorted(holdout.loc[holdout[columns].abs().sum(axis=1) > 0, "user_id"].iloc[::9].head(8))
    model = create_model("linear", {}, meta.spec, meta.horizon_days)
    model.fit(read_features(features, "train"), FitContext(seed=0, device="cpu"))
    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite'}")
    install_item_vectors(titled["vectors"])
    try:
        store.replace_all([event_columns(events)])
        scorer = Scorer(model, ModelInfo(name="user-value", version="1"), max_events=5000, max_users=50, store=store)
        by_id = scorer.score_batch([scorer.prepare([], cutoff, user_ids=users)]).scored.set_index("user_id")
        mine = events[events["user_id"].isin(users) & (events["ts"] < pd.Timestamp(cutoff))]
        sent = [Event(user_id=r.user_id, ts=r.ts.to_pydatetime(), behavior=r.behavior, item_id=r.item_id,
                      category_id=r.category_id, amount=float(r.amount)) for r in mine.itertuples()]
        by_events = scorer.score_batch([scorer.prepare(sent, cutoff)]).scored.set_index("user_id")
        # Batch scoring (`uservalue score`, the monitor) joins the same text columns after the SQL features.
        from uservalue.serving.scorer import score_events

        scored = score_events(model, titled["events"], cutoff).set_index("user_id")
        scored_from_table = score_events(model, pa.Table.from_pandas(events), cutoff).set_index("user_id")
    finally:
        install_item_vectors(None)
        store.close()
    batch = holdout.set_index("user_id").loc[users]
    for online in (by_id, by_events):
        assert list(online.index) == users
        np.testing.assert_allclose(online[columns].to_numpy(), batch[columns].to_numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(online["expected_value"].to_numpy(),
                                   model.predict(batch.reset_index())["expected_value"].to_numpy(), rtol=1e-9)
    expected = model.predict(holdout)["expected_value"].to_numpy()
    for batch_scored in (scored, scored_from_table):
        np.testing.assert_allclose(batch_scored.loc[holdout["user_id"], "expected_value"].to_numpy(), expected,
                                   rtol=1e-9)
        np.testing.assert_allclose(batch_scored.loc[users, columns].to_numpy(), batch[columns].to_numpy(), atol=1e-12)
    # Vectors that do not give the model's text columns are refused, naming the file.
    other = tmp_path / "other.parquet"
    embed_items(titled["events"], other, EmbedItemsParams(cache_dir=str(titled["dir"] / "cache"), device="cpu",
                                                          **{**TEXT, "feature_dim": 3}))
    install_item_vectors(other)
    try:
        from uservalue.errors import ConfigError
        from uservalue.features.online import online_arrays

        with pytest.raises(ConfigError, match="other.parquet"):
            online_arrays(event_columns(events.head(50)), cutoff, meta.spec)
    finally:
        install_item_vectors(None)


def test_a_saved_text_model_carries_its_vectors_and_refuses_stale_ones(titled, tmp_path: Path) -> None:
    """A model trained on text columns saves the vectors it was trained with (its MLflow artifact and the Bento
    then serve without the project), and scores with them after embed_items has written other vectors; vectors
    of another digest than the model's are refused, not silently used."""
    import dataclasses
    import shutil

    from uservalue.errors import ConfigError
    from uservalue.features.online import event_columns, online_arrays
    from uservalue.io import file_sha256
    from uservalue.models.base import FitContext
    from uservalue.models.catalog import create_model, load_model
    from uservalue.text.online import ITEM_VECTORS_FILE, install_item_vectors

    features = tmp_path / "features"
    shutil.copytree(titled["plain"], features)
    join_text_feature_sets(features, titled["events"], titled["vectors"])
    meta = read_meta(features)
    assert meta.spec.text_vectors == file_sha256(titled["vectors"])
    holdout = read_features(features, "eval")
    events = event_columns(pd.read_parquet(titled["events"]))
    model = create_model("linear", {}, meta.spec, meta.horizon_days)
    model.fit(read_features(features, "train"), FitContext(seed=0, device="cpu"))
    saved = tmp_path / "model"
    install_item_vectors(titled["vectors"])  # the project's vectors at training time
    try:
        model.save(saved)
        before = model.predict_arrays(online_arrays(events, meta.eval_cutoff, meta.spec)).expected_value
    finally:
        install_item_vectors(None)
    assert (saved / ITEM_VECTORS_FILE).read_bytes() == titled["vectors"].read_bytes()
    # embed_items ran again with other settings: the project's vectors are no longer the model's.
    later = tmp_path / "later.parquet"
    embed_items(titled["events"], later, EmbedItemsParams(cache_dir=str(titled["dir"] / "cache"), device="cpu",
                                                          **{**TEXT, "pca_dim": 6}))
    install_item_vectors(later)
    try:
        loaded = load_model(saved)  # registers the copy it carries
        after = loaded.predict_arrays(online_arrays(events, meta.eval_cutoff, loaded.spec)).expected_value
        np.testing.assert_array_equal(after, before)
        np.testing.assert_allclose(before, model.predict(holdout.sort_values("user_id"))["expected_value"].to_numpy(),
                                   rtol=1e-9)
        stale = dataclasses.replace(meta.spec, text_vectors="0" * 64)  # a model whose copy is not here
        with pytest.raises(ConfigError, match="not the ones the model was trained with"):
            online_arrays(events, meta.eval_cutoff, stale)
    finally:
        install_item_vectors(None)


def test_pooled_text_columns_of_many_users_equal_the_batch_join(titled, tmp_path: Path, monkeypatch) -> None:
    """Every user at once (the 1,000-id request's path: pandas hash lookups and one segmented sum) and the
    same through per-event dict lookups (one request's few events) give the batch join's columns."""
    import shutil

    import uservalue.text.online as text_online
    from uservalue.features.online import event_columns

    features = tmp_path / "features"
    shutil.copytree(titled["plain"], features)
    join_text_feature_sets(features, titled["events"], titled["vectors"])
    meta = read_meta(features)
    columns = list(meta.spec.text_columns)
    holdout = read_features(features, "eval").sort_values("user_id")
    events = event_columns(pd.read_parquet(titled["events"]))
    cutoff_t = pd.Timestamp(meta.eval_cutoff).timestamp()
    users = holdout["user_id"].astype(str).to_numpy(dtype=object)
    assert len(events) > text_online._DICT_LOOKUPS  # the hash-index path
    text_online.install_item_vectors(titled["vectors"])
    try:
        many = text_online.pooled_text_columns(columns, events, cutoff_t, users)
        monkeypatch.setattr(text_online, "_DICT_LOOKUPS", 10**9)
        few = text_online.pooled_text_columns(columns, events, cutoff_t, users)
    finally:
        text_online.install_item_vectors(None)
    batch = holdout[columns].to_numpy(dtype=np.float64)
    assert np.abs(batch).sum() > 0
    for j, column in enumerate(columns):
        np.testing.assert_array_equal(many[column], few[column])
        np.testing.assert_allclose(many[column], batch[:, j], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "sequence"])
def test_deep_models_take_the_text_columns_through_a_tower_of_their_own(titled, tmp_path: Path, name: str) -> None:
    """The deep models' pooled-text input (issue 23): the text columns leave the aggregate tower for a tower of
    their own (train.<model>.text_tower wide); the model saves and loads to the same numbers, and its serving
    path (the online arrays, TorchScript-traced on the CPU) scores as the batch predict."""
    import shutil

    from uservalue.features.online import event_columns, online_arrays
    from uservalue.models.base import FitContext
    from uservalue.models.catalog import create_model, load_model
    from uservalue.models.deep.layers import TextSplitTower
    from uservalue.text.online import install_item_vectors

    features = tmp_path / "features"
    shutil.copytree(titled["plain"], features)
    join_text_feature_sets(features, titled["events"], titled["vectors"])
    meta = read_meta(features)
    text = list(meta.spec.text_columns)
    model = create_model(name, {"max_epochs": 1, "text_tower": 8}, meta.spec, meta.horizon_days)
    model.fit(read_features(features, "train"), FitContext(seed=0, device="cpu"))
    tower = model.network.tower
    assert isinstance(tower, TextSplitTower)
    assert tower.text[0].in_features == len(text) and tower.text[0].out_features == 8
    assert tower.aggregates[0].in_features == len(meta.spec.aggregate_columns()) - len(text)
    # 0: the text columns join the aggregates' tower, as before the split (one Linear over every column).
    joined = create_model(name, {"max_epochs": 1, "text_tower": 0}, meta.spec, meta.horizon_days)
    joined.fit(read_features(features, "train"), FitContext(seed=0, device="cpu"))
    assert not isinstance(joined.network.tower, TextSplitTower)
    assert joined.network.tower[0].in_features == len(meta.spec.aggregate_columns())

    holdout = read_features(features, "eval").sort_values("user_id")
    predicted = model.predict(holdout)["expected_value"].to_numpy()
    install_item_vectors(titled["vectors"])
    try:
        model.save(tmp_path / "model")
        loaded = load_model(tmp_path / "model")
        events = event_columns(pd.read_parquet(titled["events"]))
        served = loaded.predict_arrays(online_arrays(events, meta.eval_cutoff, loaded.spec)).expected_value
    finally:
        install_item_vectors(None)
    np.testing.assert_allclose(loaded.predict(holdout)["expected_value"].to_numpy(), predicted, rtol=1e-6)
    np.testing.assert_allclose(served, predicted, rtol=1e-5)
