"""The offline rewrite of third-party pages and the run report page, per function (the browser checks
of whole pages are in tests/e2e/test_pages.py and the DVC pipeline test)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from pathlib import Path

import pandas as pd
import pytest

from tests.support.browser import assets, missing_local_assets, remote_assets
from uservalue.config import MetricTarget
from uservalue.reporting.offline import (
    VEGA_BUNDLE, dvc_plots_template, local_asset, make_site_offline, rewrite_page)
from uservalue.reporting.page import RunOutcome, meets, render_page

GE_HEAD = """<html><head>
<link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"
 integrity="sha384-abc" crossorigin="anonymous">
<link rel="stylesheet" href="https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css">
<link rel="stylesheet" href="https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css">
<link rel="stylesheet" href="./static/styles/data_docs_custom_styles.css">
<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>
<script src="https://cdn.jsdelivr.net/npm/vega-lite@5"></script>
<script src="https://cdn.jsdelivr.net/npm/vega-embed@6"></script>
<script src="https://code.jquery.com/jquery-3.7.1.min.js"></script>
<script src="https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js" integrity="sha384-x"
 crossorigin="anonymous"></script>
<script src="https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js"></script>
<script src="https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js"></script>
<script>vegaEmbed('#chart', {});</script>
</head><body><img src="https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png">
<a href="https://greatexpectations.io">Great Expectations</a></body></html>"""


def test_cdn_assets_are_pointed_at_local_copies_and_the_rest_dropped() -> None:
    page = rewrite_page(GE_HEAD, "../vendor")
    assert remote_assets(page) == []
    loaded = assets(page)
    assert loaded == ["../vendor/bootstrap.min.css", "../vendor/fontawesome/css/all.min.css",
                      "./static/styles/data_docs_custom_styles.css", f"../vendor/{VEGA_BUNDLE}",
                      "../vendor/jquery.min.js", "../vendor/popper.min.js", "../vendor/bootstrap.min.js"]
    assert "integrity" not in page and "crossorigin" not in page  # another build: its hash would not match
    assert "vegaEmbed('#chart'" in page  # inline scripts stay
    assert '<a href="https://greatexpectations.io">' in page  # a link a reader clicks is not a load


@pytest.mark.parametrize(("url", "local"), [
    ("https://cdn.jsdelivr.net/npm/vega-lite@5", VEGA_BUNDLE),
    ("https://code.jquery.com/jquery-3.7.1.min.js", "jquery.min.js"),
    ("https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js", None),
])
def test_local_asset_by_url(url: str, local: str | None) -> None:
    assert local_asset(url) == local


def test_a_site_is_rewritten_with_its_assets_beside_it(tmp_path: Path) -> None:
    site = tmp_path / "docs"
    (site / "validations" / "run").mkdir(parents=True)
    (site / "index.html").write_text(GE_HEAD)
    (site / "validations" / "run" / "page.html").write_text(GE_HEAD)
    (site / "static" / "styles").mkdir(parents=True)
    (site / "static" / "styles" / "data_docs_custom_styles.css").write_text("body {}")
    assert make_site_offline(site) == 2
    deep = (site / "validations" / "run" / "page.html").read_text()
    assert "/".join(["..", "..", "vendor", "jquery.min.js"]) in deep  # two folders up: the site root
    assert remote_assets(deep) == []
    assert missing_local_assets((site / "index.html").read_text(), site / "index.html") == []
    assert (site / "vendor" / "fontawesome" / "webfonts" / "fa-solid-900.woff2").is_file()  # all.min.css needs it


def test_an_unknown_cdn_fails_the_rewrite_rather_than_leaving_a_blank_page(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text('<iframe src="https://example.com/widget"></iframe>')
    with pytest.raises(RuntimeError, match="still loads a remote asset"):
        make_site_offline(tmp_path)


def test_dvc_plots_template_inlines_vega_and_never_asks_dvc_for_its_cdn_scripts() -> None:
    template = dvc_plots_template()
    assert "{plot_divs}" in template and "{scripts}" not in template  # DVC adds its CDN tags at {scripts}
    assert remote_assets(template) == []
    assert "window.vegaEmbed" in template
    inline = template[template.index("<script"): template.rindex("</script>")]
    assert "</script" not in inline[8:]  # the bundle cannot end its own tag early


TARGETS = {"gini": MetricTarget(target=0.73, direction="min", anchor=0.712),
           "decile_mape": MetricTarget(target=0.1, direction="max"),
           "total_error": MetricTarget(target=0.03, direction="abs")}


@pytest.mark.parametrize(("metric", "value", "expected"), [
    ("gini", 0.73, True), ("gini", 0.7299, False), ("decile_mape", 0.1, True), ("decile_mape", 0.2, False),
    ("total_error", -0.03, True), ("total_error", 0.031, False)])
def test_meets_its_target_at_the_edges(metric: str, value: float, expected: bool) -> None:
    assert meets(TARGETS[metric], value) is expected


def outcome() -> RunOutcome:
    fractions = [0.0, 0.5, 1.0]
    return RunOutcome(
        metrics={"champion": "mlp", "primary_metric": "gini", "eval_cutoff": "1997-10-01", "horizon_days": 273,
                 "users": 100, "features_md5": "abc.dir",
                 "models": {"mlp": {"gini": 0.7214992078991985, "decile_mape": 0.35, "total_error": -0.081},
                            "linear": {"gini": 0.7401, "decile_mape": 0.09, "total_error": 0.02}}},
        gains=pd.DataFrame({"fraction_users": fractions, "mlp": [0.0, 0.8, 1.0], "linear": [0.0, 0.7, 1.0]}),
        deciles=pd.DataFrame({"decile": range(10), "mlp": range(10), "linear": range(10)}),
        deciles_actual=pd.DataFrame({"decile": range(10), "actual": [v * 1.1 for v in range(10)]}),
        registry={"model_name": "user-value", "primary_metric": "gini", "min_delta": 0.0, "champion_version": "1",
                  "candidate": {"model": "mlp", "version": "3", "run_id": "r"},
                  "decision": {"alias": "challenger", "promote": False, "reasons": ["gini: no better <than> 0.72"]}},
        validation={"success": True, "rows": 69659, "rows_quarantined": 0, "mode": "fail",
                    "expectations_evaluated": 18, "failed_expectations": []},
        monitoring={"drift_detected": False, "drifted_share": 0.25, "report": "x.html",
                    "columns": {"p_buy": {"method": "wasserstein", "score": 0.01, "threshold": 0.1, "drifted": False}}},
        recs={"eval_cutoff": "1997-10-01", "horizon_days": 273, "users": 50, "primary_metric": "recall_at_20",
              "champion": "taste", "ratios": {"recall_at_20 champion / popularity": 10.7},
              "models": {"popularity": {"recall_at_20": 0.053, "ndcg_at_20": 0.058, "hit_rate_at_10": 0.28,
                                        "coverage": 0.0005},
                         "taste": {"recall_at_20": 0.5675123, "ndcg_at_20": 0.598, "hit_rate_at_10": 0.94,
                                   "coverage": 0.5}},
              "planted_truth": {"recall_at_20": 0.69, "ndcg_at_20": 0.70, "hit_rate_at_10": 0.975, "coverage": 0.48}},
        lineage={"git commit": "0123abc"}, links={"data_docs": "validation/data_docs/index.html"})


def page_values(page: str) -> dict[str, str]:
    cells = {f"{m}.{k}": v for m, k, v in
             re.findall(r'data-model="([^"]+)" data-metric="([^"]+)" data-value="([^"]+)"', page)}
    keys = dict(re.findall(r'data-key="([^"]+)"\s+data-value="([^"]*)"', page))
    return {**cells, **keys}


def test_the_page_shows_every_figure_exactly_and_marks_targets() -> None:
    result = outcome()
    page = render_page(result, TARGETS, dt.datetime(2026, 11, 30, tzinfo=dt.UTC))
    values = page_values(page)
    for model, scores in result.metrics["models"].items():
        for metric, value in scores.items():
            assert float(values[f"{model}.{metric}"]) == value
    assert values["metrics.champion"] == "mlp"
    assert values["registry.promote"] == "false" and values["registry.candidate.version"] == "3"
    assert values["validation.rows"] == "69659" and values["monitoring.drift_detected"] == "false"
    assert remote_assets(page) == [] and "<script" not in page  # static: nothing to load, nothing to run
    assert page.count("<svg") == 2  # gains and the champion's calibration, inline
    assert "&lt;than&gt;" in page  # reasons are text, never markup
    assert re.search(r'class="ok"[^>]*data-model="linear" data-metric="gini"', page)
    assert re.search(r'class="miss champion"[^>]*data-model="mlp" data-metric="gini"', page)


def test_the_page_shows_the_recommenders_of_train_recs() -> None:
    result = outcome()
    values = page_values(render_page(result, TARGETS, dt.datetime(2026, 11, 30, tzinfo=dt.UTC)))
    assert result.recs is not None and values["recs.champion"] == "taste"
    for name, scores in {**result.recs["models"], "planted truth": result.recs["planted_truth"]}.items():
        for metric, value in scores.items():
            assert float(values[f"recs.{name}.{metric}"]) == value
    without = render_page(dataclasses.replace(result, recs=None), TARGETS, dt.datetime(2026, 11, 30, tzinfo=dt.UTC))
    assert "train_recs stage has not run" in without and "recs.champion" not in page_values(without)
