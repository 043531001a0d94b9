"""Item text (issue 23): the optional item_text column (file source, gate) and the embed_items stage with
the real shipped all-MiniLM-L6-v2 on CPU (offline), its text-hash cache, and the skip without text."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO_ROOT
from uservalue import limits
from uservalue.config import DataParams, EmbedItemsParams, ValidateParams
from uservalue.data.sources import ingest
from uservalue.data.validation import validate_file
from uservalue.errors import InputError, ValidationFailed
from uservalue.schema import EVENTS_SCHEMA, EVENTS_TEXT_SCHEMA, ITEM_TEXT
from uservalue.text.embed import embed_items, read_item_vectors

BEHAVIORS = ("view", "fav", "cart", "buy")
CANONICAL = ["user_id", "ts", "behavior", "item_id", "category_id", "quantity", "amount"]
COLUMNS = {c: c for c in CANONICAL} | {ITEM_TEXT: "title"}
TITLES = {"i1": "red wool scarf", "i2": "warm red woollen scarf", "i3": "blue ceramic coffee mug",
          "i4": "stainless steel kitchen knife", "i5": "  "}  # i5: blank, read as no text
GATE = ValidateParams(ts_min=dt.date(2019, 1, 1), ts_max=dt.date(2021, 1, 1), min_users=1, min_purchases=1)


def _log(titles: dict[str, str] = TITLES) -> pd.DataFrame:
    rows = []
    for n, item in enumerate(titles):
        for user in ("u1", "u2"):
            rows.append((user, f"2020-01-{n + 1:02d}T10:00:00", "view", item, "c1", 1, 0.0, titles[item]))
        rows.append(("u1", f"2020-01-{n + 1:02d}T12:00:00", "buy", item, "c1", 1, 5.0 + n, titles[item]))
    return pd.DataFrame(rows, columns=[*CANONICAL, "title"])


def _ingest(tmp: Path, frame: pd.DataFrame, name: str = "log", mapped: bool = True) -> Path:
    path = tmp / f"{name}.csv"
    frame.to_csv(path, index=False)
    columns = COLUMNS if mapped else {c: c for c in CANONICAL}
    out = tmp / f"{name}.parquet"
    ingest(DataParams(source="file", path=str(path), file={"columns": columns}), out, tmp / f"{name}_truth")
    return out


def _columns(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    return [(f.name, f.type) for f in schema]


def _gate(tmp: Path, events: Path):
    return validate_file(events, GATE, BEHAVIORS, out=tmp / "validated.parquet", quarantine_out=tmp / "q.parquet",
                         report_dir=tmp / "validation")


def test_file_source_maps_item_text_and_a_log_without_it_keeps_the_schema(tmp_path: Path) -> None:
    events = pq.read_table(_ingest(tmp_path, _log()))
    assert _columns(events.schema) == _columns(EVENTS_TEXT_SCHEMA)
    texts = dict(zip(events.column("item_id").to_pylist(), events.column(ITEM_TEXT).to_pylist(), strict=True))
    assert texts["i1"] == "red wool scarf" and texts["i5"] is None  # trimmed; blank is no text
    outcome = _gate(tmp_path, _ingest(tmp_path, _log()))
    assert outcome.success and _columns(pq.read_schema(tmp_path / "validated.parquet")) == _columns(
        EVENTS_TEXT_SCHEMA)
    # Not mapped (CDNOW, Taobao and any file without a text column): exactly the schema of before.
    assert _columns(pq.read_schema(_ingest(tmp_path, _log(), "plain", mapped=False))) == _columns(EVENTS_SCHEMA)


@pytest.mark.parametrize("bad, problem", [("x" * (limits.ITEM_TEXT_MAX_LENGTH + 1), "value_lengths"),
                                          ("bell\x07ringer", "values_to_match_regex")])
def test_gate_rejects_too_long_or_control_text_naming_row_and_column(tmp_path: Path, bad: str, problem: str) -> None:
    frame = _log()
    frame.loc[frame["item_id"] == "i3", "title"] = bad
    with pytest.raises(ValidationFailed) as raised:
        _gate(tmp_path, _ingest(tmp_path, frame))
    message = str(raised.value)
    assert f"expect_column_{problem}" in message and f"({ITEM_TEXT})" in message, message
    assert "{'row': " in message and "'item_id': 'i3'" in message, message  # the rows, with the offending item


def test_text_that_is_not_utf8_is_an_error_naming_row_and_column(tmp_path: Path) -> None:
    csv = tmp_path / "log.csv"
    _log().to_csv(csv, index=False)
    csv.write_bytes(csv.read_bytes().replace(b"blue ceramic", b"blue \xff ceramic", 1))
    params = DataParams(source="file", path=str(csv), file={"columns": COLUMNS})
    with pytest.raises(InputError) as raised:
        ingest(params, tmp_path / "e.parquet", tmp_path / "t")
    first_mug = 2 + list(_log()["title"]).index(TITLES["i3"])  # header is line 1
    assert raised.value.row == first_mug and raised.value.column == "title"
    # Parquet strings are not checked by the reader: the source checks them.
    frame = _log().drop(columns="title")
    titles = [t.encode() for t in _log()["title"]]
    titles[4] = b"mug \xfe\xff"
    offsets = np.cumsum([0, *map(len, titles)]).astype(np.int32)
    text = pa.Array.from_buffers(pa.string(), len(titles), [None, pa.py_buffer(offsets.tobytes()),
                                                             pa.py_buffer(b"".join(titles))])
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False).append_column("title", text),
                   tmp_path / "log.parquet")
    params = DataParams(source="file", path=str(tmp_path / "log.parquet"), file={"columns": COLUMNS})
    with pytest.raises(InputError) as raised:
        ingest(params, tmp_path / "p.parquet", tmp_path / "t")
    assert raised.value.row == 5 and raised.value.column == "title" and "UTF-8" in str(raised.value)


def _stage(tmp: Path, events: Path, cache: Path) -> tuple[dict, Path, subprocess.CompletedProcess]:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["embed_items"].update({"cache_dir": str(cache), "pca_dim": 4, "batch_size": 2, "device": "cpu"})
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    out, summary = tmp / "item_vectors.parquet", tmp / "embed_items.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "pipelines" / "embed_items.py"), "--params",
                           str(tmp / "params.yaml"), "--events", str(events), "--out", str(out), "--summary",
                           str(summary)], cwd=tmp, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(summary.read_text()), out, done


@pytest.mark.slow
def test_embed_stage_embeds_each_text_once_then_reruns_from_the_cache(tmp_path: Path) -> None:
    events, cache = _ingest(tmp_path, _log()), tmp_path / "cache"
    summary, out, done = _stage(tmp_path, events, cache)  # the real entry script, the real model on CPU
    assert summary["items"] == 4 and summary["texts"] == 4 and summary["embedded"] == 4 and summary["cached"] == 0
    assert summary["device"] == "cpu" and summary["dim"] == 4 and summary["texts_per_s"] > 0
    assert "texts/s" in done.stderr  # time and rate in the stage log
    items, vectors = read_item_vectors(out)
    assert items == ["i1", "i2", "i3", "i4"] and vectors.shape == (4, 4)
    # Full vectors from the cache: the model puts the two scarves closest together.
    full = embed_items(events, tmp_path / "full.parquet", EmbedItemsParams(cache_dir=str(cache), pca_dim=None))
    assert full.embedded == 0 and full.cached == 4 and full.dim == 384
    _, raw = read_item_vectors(tmp_path / "full.parquet")
    similarity = raw @ raw.T
    assert np.allclose(np.diag(similarity), 1, atol=1e-5)
    assert similarity[0, 1] > max(similarity[0, 2], similarity[0, 3], similarity[1, 2], similarity[1, 3])
    # A rerun embeds nothing; one new title is the only text embedded.
    again = embed_items(events, tmp_path / "again.parquet", EmbedItemsParams(cache_dir=str(cache), pca_dim=4))
    assert again.embedded == 0 and again.cached == 4
    assert pq.read_table(tmp_path / "again.parquet").equals(pq.read_table(out))
    more = _ingest(tmp_path, _log({**TITLES, "i6": "green garden hose"}), "more")
    grown = embed_items(more, tmp_path / "more.parquet", EmbedItemsParams(cache_dir=str(cache), pca_dim=4,
                                                                          device="cpu"))
    assert grown.embedded == 1 and grown.cached == 4 and grown.items == 5


def test_embed_stage_without_text_writes_an_empty_table_and_loads_no_model(tmp_path: Path) -> None:
    events, cache = _ingest(tmp_path, _log(), mapped=False), tmp_path / "cache"
    summary = embed_items(events, tmp_path / "v.parquet", EmbedItemsParams(cache_dir=str(cache), pca_dim=8))
    assert summary.skipped and ITEM_TEXT in summary.skipped and summary.embedded == 0 and summary.device is None
    table = pq.read_table(tmp_path / "v.parquet")
    assert table.num_rows == 0 and table.schema.field("vector").type.list_size == 8
    assert not cache.exists()  # the model was never unpacked (nor loaded)
    with pytest.raises(InputError):
        embed_items(tmp_path / "absent.parquet", tmp_path / "x.parquet", EmbedItemsParams(cache_dir=str(cache)))


def test_synthetic_titles_are_opt_in_and_carry_the_planted_word_value(tmp_path: Path) -> None:
    from uservalue.config import SyntheticSource
    from uservalue.data.sources.synthetic import TITLE_WORDS, generate

    plain = SyntheticSource(users=600, events_per_user=40, seed=5, categories=20, items_per_category=50)
    assert plain.titles is None  # off by default: the log has no text column
    generate(plain, tmp_path / "plain.parquet", tmp_path / "plain_truth")
    assert ITEM_TEXT not in pq.read_schema(tmp_path / "plain.parquet").names
    titled = SyntheticSource(**{**plain.model_dump(), "titles": {"words": 20, "value_words": 4, "words_per_title": 3}})
    generate(titled, tmp_path / "titled.parquet", tmp_path / "truth")
    events = pd.read_parquet(tmp_path / "titled.parquet")
    assert events[ITEM_TEXT].notna().all()
    words = events[ITEM_TEXT].str.split()
    assert words.map(len).eq(3).all() and set(words.explode()) <= set(TITLE_WORDS[:20])
    # An item has one title; the planted words raise price and purchase propensity.
    assert events.groupby("item_id")[ITEM_TEXT].nunique().eq(1).all()
    valued = words.map(lambda ws: sum(w in TITLE_WORDS[:4] for w in ws) > 0)
    buys = events["behavior"] == "buy"
    assert events.loc[buys & valued, "amount"].mean() > 1.2 * events.loc[buys & ~valued, "amount"].mean()
    assert buys[valued].mean() > buys[~valued].mean()
    truth = json.loads((tmp_path / "truth" / "truth.json").read_text())
    assert truth["titles"]["value_word_list"] == list(TITLE_WORDS[:4])
    assert "title_lean" in pd.read_parquet(tmp_path / "truth" / "users.parquet").columns


@pytest.mark.slow
def test_a_model_with_text_features_recovers_the_planted_word_effect(tmp_path: Path) -> None:
    """Titles whose words raise price and purchase propensity (data.synthetic.titles), embedded by the real
    model: gbdt with the pooled text columns predicts more for a user whose items carry the value words."""
    import dataclasses

    from uservalue.config import FeaturizeParams, SplitParams, SyntheticSource
    from uservalue.data.sources.synthetic import TITLE_WORDS, generate
    from uservalue.features.store import read_features, read_meta, write_feature_sets
    from uservalue.models.base import FitContext
    from uservalue.models.catalog import create_model
    from uservalue.text.features import add_text_features, text_feature_columns

    titles = {"words": 12, "value_words": 3, "words_per_title": 2, "price_effect": 1.0, "buy_effect": 1.0, "lean": 1.0}
    source = SyntheticSource(users=1000, events_per_user=40, seed=11, categories=10, items_per_category=30,
                             titles=titles)
    events = tmp_path / "events.parquet"
    generate(source, events, tmp_path / "truth")
    vectors = tmp_path / "item_vectors.parquet"
    summary = embed_items(events, vectors, EmbedItemsParams(cache_dir=str(tmp_path / "cache"), pca_dim=8,
                                                            device="cpu"))
    assert summary.embedded == summary.texts <= 12 * 11
    split = SplitParams(eval_cutoff="1998-01-01", horizon_days=120, train_cutoffs=["1997-09-03", "1997-11-02"])
    write_feature_sets(events, split, FeaturizeParams(sequence_length=10), BEHAVIORS, tmp_path / "features")
    meta = read_meta(tmp_path / "features")
    behaviors, dim = ["view", "cart", "buy"], 4
    train, holdout = (add_text_features(read_features(tmp_path / "features", name), events, vectors, behaviors, 20,
                                        dim) for name in ("train", "eval"))
    columns = text_feature_columns(behaviors, dim)
    assert train[columns].abs().to_numpy().sum() > 0  # the join found the users' items
    model = create_model("gbdt", {"num_threads": 2}, dataclasses.replace(meta.spec, text_columns=tuple(columns)),
                         meta.horizon_days)
    model.fit(train, FitContext(seed=0, device="cpu"))
    # Counterfactual: the same users, their pooled text set to that of value-word items, or of plain ones.
    items, matrix = read_item_vectors(vectors)
    text_of = pd.read_parquet(events, columns=["item_id", ITEM_TEXT]).drop_duplicates("item_id").set_index("item_id")
    valued = np.array([any(w in TITLE_WORDS[:3] for w in text_of.loc[i, ITEM_TEXT].split()) for i in items])
    predicted = {}
    for name, mask in (("value", valued), ("plain", ~valued)):
        pooled = matrix[mask, :dim].mean(axis=0)
        rows = holdout.copy()
        rows[columns] = np.tile(pooled, len(behaviors))
        predicted[name] = model.predict(rows)["expected_value"].to_numpy()
    assert predicted["value"].mean() > predicted["plain"].mean(), {k: v.mean() for k, v in predicted.items()}
    assert (predicted["value"] > predicted["plain"]).mean() > 0.5


def test_considered_purchases_move_only_the_value_items_buys_later(tmp_path: Path) -> None:
    """titles.consider_days (a stronger planted effect, opt-in): value items are bought later; the events that
    are not purchases are the same."""
    from uservalue.config import SyntheticSource
    from uservalue.data.sources.synthetic import TITLE_WORDS, generate

    base = {"users": 400, "events_per_user": 30, "seed": 2, "categories": 10, "items_per_category": 20}
    titles = {"words": 20, "value_words": 4, "words_per_title": 3}
    logs = {}
    for name, extra in (("now", {}), ("later", {"consider_days": 60.0})):
        generate(SyntheticSource(**base, titles={**titles, **extra}), tmp_path / f"{name}.parquet", tmp_path / name)
        logs[name] = pd.read_parquet(tmp_path / f"{name}.parquet")
    valued = {name: log[ITEM_TEXT].str.split().map(lambda ws: any(w in TITLE_WORDS[:4] for w in ws))
              for name, log in logs.items()}
    parts = {name: {"other": log[log["behavior"] != "buy"].reset_index(drop=True),
                    "value buys": log[(log["behavior"] == "buy") & valued[name]]} for name, log in logs.items()}
    pd.testing.assert_frame_equal(parts["now"]["other"], parts["later"]["other"])
    now, later = parts["now"]["value buys"], parts["later"]["value buys"]
    assert len(now) > 50 and (later["ts"] - pd.Timestamp("1997-01-01", tz="UTC")).mean() > (
        now["ts"] - pd.Timestamp("1997-01-01", tz="UTC")).mean()
