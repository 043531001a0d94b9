"""The ensemble model: the mean of independently fitted members, one self-contained directory."""

from __future__ import annotations

import numpy as np
import pytest

from uservalue.errors import ConfigError
from uservalue.models.base import FitContext
from uservalue.models.catalog import create_model, load_model

# Cheap members (tests/model/test_fast_path.py covers an ensemble with btyd and a torch member).
MEMBERS = {"gbdt": {"max_rounds": 60, "early_stopping_rounds": 10}, "linear": {}}


@pytest.fixture(scope="module")
def ensemble_and_members(cdnow_features, tmp_path_factory):
    spec, horizon = cdnow_features.spec, cdnow_features.horizon_days
    ensemble = create_model("ensemble", {"members": MEMBERS}, spec, horizon)
    ensemble.fit(cdnow_features.train, FitContext(seed=0, checkpoint_dir=tmp_path_factory.mktemp("ens")))
    members = {}
    for name, params in MEMBERS.items():
        members[name] = create_model(name, params, spec, horizon)
        members[name].fit(cdnow_features.train, FitContext(seed=0))
    return ensemble, members


def test_ensemble_is_the_mean_of_members_fitted_on_their_own(ensemble_and_members, cdnow_features) -> None:
    ensemble, members = ensemble_and_members
    predicted = ensemble.predict(cdnow_features.eval)
    alone = [m.predict(cdnow_features.eval) for m in members.values()]
    for column in ("p_buy", "expected_value"):
        mean = np.mean([a[column].to_numpy() for a in alone], axis=0)
        np.testing.assert_allclose(predicted[column].to_numpy(), mean, rtol=1e-9)
    # The mean lies between its members for every user.
    values = np.stack([a["expected_value"].to_numpy() for a in alone])
    assert np.all(predicted["expected_value"].to_numpy() <= values.max(axis=0) + 1e-9)
    assert np.all(predicted["expected_value"].to_numpy() >= values.min(axis=0) - 1e-9)


def test_saved_ensemble_holds_its_members(ensemble_and_members, cdnow_features, tmp_path) -> None:
    ensemble, _members = ensemble_and_members
    ensemble.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model" / "members").iterdir()) == sorted(MEMBERS)
    loaded = load_model(tmp_path / "model")
    for name in MEMBERS:  # each member is a model of its own, loadable alone
        assert load_model(tmp_path / "model" / "members" / name).name == name
    np.testing.assert_allclose(loaded.predict(cdnow_features.eval)["expected_value"].to_numpy(),
                               ensemble.predict(cdnow_features.eval)["expected_value"].to_numpy(), rtol=1e-12)


def test_member_errors_name_the_ensemble_field(cdnow_features) -> None:
    spec, horizon = cdnow_features.spec, cdnow_features.horizon_days
    with pytest.raises(ConfigError, match=r"train\.ensemble\.members\.gbdt\.num_leavs"):
        create_model("ensemble", {"members": {"gbdt": {"num_leavs": 3}, "linear": {}}}, spec, horizon)
    with pytest.raises(ConfigError, match="nested"):
        create_model("ensemble", {"members": {"ensemble": {}, "linear": {}}}, spec, horizon)
    with pytest.raises(ConfigError, match="at least two"):
        create_model("ensemble", {"members": {"linear": {}}}, spec, horizon)
