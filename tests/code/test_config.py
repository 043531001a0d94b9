"""params.yaml is typed: good files parse, mistakes are named by their dotted field."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.conftest import REPO_ROOT, merge
from uservalue.config import load_params, parse_params
from uservalue.errors import ConfigError


def test_repository_params_parse_with_cdnow_split() -> None:
    from uservalue.data.window import resolve_split

    params = load_params(REPO_ROOT / "params.yaml")
    assert params.data.source == "cdnow"
    # `auto` on CDNOW is the literature's split, written out in params.yaml (split.sources.cdnow).
    log = (dt.datetime(1997, 1, 1, tzinfo=dt.UTC), dt.datetime(1998, 6, 30, tzinfo=dt.UTC))
    split = resolve_split(params.split, "cdnow", log)
    assert split.eval_cutoff_utc == dt.datetime(1997, 10, 1, tzinfo=dt.UTC)
    assert split.horizon_days == 273
    assert split.train_cutoffs_utc == (dt.datetime(1997, 4, 1, tzinfo=dt.UTC), dt.datetime(1997, 7, 1, tzinfo=dt.UTC))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"data.source": "csv"}, "data.source"),
        ({"data.source": "taobao", "data.path": None}, "data"),
        ({"data.synthetic.users": 0}, "data.synthetic.users"),
        ({"data.synthetic.influence": {"view": 2.0, "fav": 0.1, "cart": 0.1}}, "data.synthetic"),
        ({"validate.mode": "lenient"}, "validate.mode"),
        ({"validate.max_duplicate_share": 1.5}, "validate.max_duplicate_share"),
        ({"split.eval_cutoff": "1997-10-01", "split.train_cutoffs": ["1997-12-01"]}, "split"),
        ({"split.horizon_days": 0}, "split.horizon_days"),
        ({"featurize.sequence_lenght": 10}, "featurize.sequence_lenght"),
        ({"data.file.columns": {"user_id": "u", "ts": "t"}}, "data.file.columns"),
        ({"data.behaviors": ["view", "add-to-cart", "buy"]}, "data.behaviors"),
    ],
)
def test_bad_params_name_the_field(repo_params: dict, overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_params(merge(repo_params, overrides), "params.yaml")
    assert f"params.yaml: {field}" in str(raised.value)


def test_missing_or_unreadable_params_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_sections_of_later_issues_are_tolerated(repo_params: dict) -> None:
    params = parse_params(merge(repo_params, {"package.bento_name": "user-value"}))
    assert params.split.sources["cdnow"].horizon_days == 273


def test_train_section_is_typed(repo_params: dict) -> None:
    params = parse_params(repo_params)
    assert params.train.models == ("historical", "btyd", "gbdt", "linear", "mlp", "sequence")
    assert params.register_.model_name == "user-value"
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        parse_params(merge(repo_params, {"train.epochs": 3}))
    with pytest.raises(ConfigError, match=r"train\.models.*unknown models \['xgb'\]"):
        parse_params(merge(repo_params, {"train.models": ["gbdt", "xgb"]}))
    with pytest.raises(ConfigError, match=r"register\.min_delta"):
        parse_params(merge(repo_params, {"register.min_delta": -1}))
    with pytest.raises(ConfigError, match=r"register\.guards"):
        parse_params(merge(repo_params, {"register.guards": {"accuracy": 0.1}}))
