"""Behaviour influence of every trained model side by side (models/<model>/influence.json, written by
the train stage; definitions in uservalue.models.influence), with the planted truth next to them on
synthetic data: the `uservalue influence` command and a section of reports/model_comparison.md."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from uservalue.config import Params, SyntheticSource
from uservalue.errors import InputError
from uservalue.models.influence import planted_truth
from uservalue.schema import PURCHASE

INFLUENCE_FILE = "influence.json"
TRUTH = "truth"


def read_tables(models_dir: str | Path, models: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each model's influence.json; a model without tables (purchases only: historical, BTYD) is
    left out. A file that is not the tables' JSON is a clear error naming it."""
    if not Path(models_dir).is_dir():
        raise InputError(models_dir, "no such folder", expected="the train stage's models folder (models/<model>/)")
    tables: dict[str, dict[str, Any]] = {}
    for name in models:
        path = Path(models_dir) / name / INFLUENCE_FILE
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise InputError(path, f"not JSON ({error.msg}, line {error.lineno})",
                             expected="the train stage's influence tables") from None
        if not raw:
            continue  # a model that sees only purchases writes {}
        if not isinstance(raw, dict) or "share" not in raw or "effect" not in raw:
            raise InputError(path, "no 'share' and 'effect' tables", expected="the train stage's influence tables")
        tables[name] = raw
    return tables


def drifted_mix(cfg: SyntheticSource) -> dict[str, float]:
    """The behaviour mix the generator draws from (its truth.json's `behavior_mix`: the params' mix,
    views scaled by 1 + drift, the others by 1 - 0.6 drift, normalised), held equal to the
    generator's by tests/model/test_influence.py; computed here so the stages that write reports
    do not depend on the generator's code."""
    mix = {b: share * ((1 + cfg.drift) if b == "view" else (1 - 0.6 * cfg.drift)) for b, share in cfg.behavior_mix.items()}
    total = sum(mix.values())
    return {b: share / total for b, share in mix.items()}


def truth_tables(params: Params) -> dict[str, Any] | None:
    """The planted truth of a synthetic source (models.influence.planted_truth of its influence and
    its drifted behaviour mix); None for any other source."""
    if params.data.source != "synthetic":
        return None
    cfg = params.data.synthetic
    return planted_truth(cfg.influence, drifted_mix(cfg), tuple(params.data.behaviors))


def _effect_text(value: Mapping[str, float] | float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, Mapping):
        return f"{value['mean']:.4g} [{value['low']:.3g}, {value['high']:.3g}]"
    return f"{value:.4g}"


def influence_markdown(tables: Mapping[str, Mapping[str, Any]], truth: Mapping[str, Any] | None,
                       behaviors: Sequence[str], heading: str = "## Behaviour influence") -> str:
    """Two tables, one column per model (and the truth): `effect` (change in expected_value from one
    more event at the cutoff, 95% interval; '-': none, e.g. a behaviour the model never saw) and
    `share` (mean per-user share of the prediction above the no-behaviour baseline)."""
    columns = list(tables) + ([TRUTH] if truth else [])
    lines = [heading, ""]
    if not columns:
        return "\n".join([*lines, "No influence tables: no trained model sees behaviours other than purchases.", ""])
    lines += [
        ("`effect[b]`: expected change in expected_value when one more event of behaviour b is added to a "
        "user's history at the cutoff (mean over users, 95% interval); the truth column is the planted "
        "P(purchase | one event), to compare by order. `share[b]`: each behaviour's share of a user's "
        "prediction above the no-behaviour baseline (Shapley over behaviour groups), averaged over users."),
        "",
        "| effect | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for b in behaviors:
        if b == PURCHASE:
            continue
        cells = [_effect_text(tables[m]["effect"].get(b)) for m in tables]
        if truth:
            cells.append(_effect_text(truth["effect"].get(b)))
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "| share | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for b in behaviors:
        cells = [f"{tables[m]['share'].get(b, 0.0):.3f}" for m in tables]
        if truth:
            cells.append(f"{truth['share'].get(b, 0.0):.3f}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def influence_section(params: Params, models_dir: str | Path) -> str:
    """The model comparison's influence section for the trained models of `params`."""
    return influence_markdown(read_tables(models_dir, params.train.models), truth_tables(params),
                              tuple(params.data.behaviors))
