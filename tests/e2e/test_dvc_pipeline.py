"""The real pipeline: `dvc repro` and `dvc exp run` in a temporary git repository (slow)."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.e2e.conftest import run_in, set_param
from tests.support.browser import coloured_share, dump_dom, missing_local_assets, remote_assets, screenshot

pytestmark = pytest.mark.slow


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(make_project) -> Path:
    return make_project()


@pytest.fixture(scope="module")
def reproduced(repo: Path) -> Path:
    run_in(repo, "dvc", "repro")
    return repo


def test_repro_builds_every_stage_on_cdnow(reproduced: Path) -> None:
    evaluation = pd.read_parquet(reproduced / "data/features/eval.parquet")
    assert len(evaluation) == 23_570
    summary = json.loads((reproduced / "reports/validation/summary.json").read_text())
    assert summary["success"] and summary["rows"] == 69_659
    lock = yaml.safe_load((reproduced / "dvc.lock").read_text())
    models = yaml.safe_load((reproduced / "params.yaml").read_text())["train"]["models"]
    assert set(lock["stages"]) == {"ingest", "validate", "materialize", "featurize", "evaluate", "register", "package",
                                   "train_recs", "monitor", "report", "embed_items", *(f"train@{m}" for m in models)}
    materialized = json.loads((reproduced / "reports/materialize.json").read_text())
    assert materialized["users"] == 23_570 and materialized["events"] == 69_659
    assert lock["stages"]["featurize"]["params"]["params.yaml"]["split"]["sources"]["cdnow"]["horizon_days"] == 273
    # split `auto` on CDNOW: the literature's split, resolved by featurize (issue 17).
    split = json.loads((reproduced / "reports/split.json").read_text())
    assert (split["eval_cutoff"], split["horizon_days"]) == ("1997-10-01T00:00:00+00:00", 273)
    assert split["train_cutoffs"] == ["1997-04-01T00:00:00+00:00", "1997-07-01T00:00:00+00:00"]


def test_default_monitor_compares_like_with_like(reproduced: Path) -> None:
    """Nothing changed since featurize: the batch is scored at the reference's cutoff, no drift (issue 17)."""
    verdict = json.loads((reproduced / "reports/monitoring/latest.json").read_text())
    assert verdict["drift_detected"] is False and verdict["drifted_columns"] == [], verdict["columns"]
    assert verdict["current"]["as_of"] == "1997-10-01T00:00:00+00:00"
    assert verdict["reference"]["cutoff"].startswith("1997-10-01")


def test_repro_trains_evaluates_and_registers_a_champion(reproduced: Path) -> None:
    import mlflow

    report = json.loads((reproduced / "reports/metrics.json").read_text())
    models = yaml.safe_load((reproduced / "params.yaml").read_text())["train"]["models"]
    assert set(report["models"]) == set(models) and report["champion"] in models
    for row in report["models"].values():
        assert set(row) == {"gini", "spearman", "mae", "rmse", "top_decile_capture", "decile_mape",
                            "total_error", "auc"}
    assert "| model |" in (reproduced / "reports/model_comparison.md").read_text()
    gains = pd.read_csv(reproduced / "reports/plots/gains.csv")
    assert list(gains.columns) == ["fraction_users", *models]
    registry = json.loads((reproduced / "reports/registry.json").read_text())
    assert registry["decision"]["alias"] == "champion" and registry["candidate"]["model"] == report["champion"]

    mlflow.set_tracking_uri(f"sqlite:///{reproduced / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("user-value", "champion")
    assert champion.run_id == report["runs"][report["champion"]]
    # The training run records the DVC hash of the features it trained on.
    lock = yaml.safe_load((reproduced / "dvc.lock").read_text())
    features_md5 = next(o["md5"] for o in lock["stages"]["featurize"]["outs"] if o["path"] == "data/features")
    assert client.get_run(champion.run_id).data.tags["dvc.data/features"] == features_md5



def test_dvc_plots_render_offline_in_a_browser(reproduced: Path, tmp_path: Path) -> None:
    # The bare command (the template comes from .dvc/config): one series per model, drawn with no internet.
    run_in(reproduced, "dvc", "plots", "show", "-o", str(reproduced / "plots_html"))
    page = reproduced / "plots_html" / "index.html"
    assert remote_assets(page.read_text()) == []
    dom = dump_dom(page, tmp_path)
    # Vega draws each chart as <svg class="marks">; the other <svg>s are its menu icons.
    charts = re.findall(r'<svg[^>]*class="marks".*?</svg>', dom, flags=re.DOTALL)
    assert len(charts) >= 2 and all("<path" in chart for chart in charts), dom[-3000:]
    assert coloured_share(screenshot(page, tmp_path, "dvc-plots")) > 0.01  # lines on the page, not blank


def test_report_page_shows_the_runs_figures_offline(reproduced: Path, tmp_path: Path) -> None:
    page = reproduced / "reports" / "index.html"
    html = page.read_text()
    metrics = json.loads((reproduced / "reports/metrics.json").read_text())
    registry = json.loads((reproduced / "reports/registry.json").read_text())
    cells = {(model, metric): float(value) for model, metric, value in
             re.findall(r'data-model="([^"]+)" data-metric="([^"]+)" data-value="([^"]+)"', html)}
    assert cells == {(model, metric): value for model, scores in metrics["models"].items()
                     for metric, value in scores.items()}
    keys = dict(re.findall(r'data-key="([^"]+)"\s+data-value="([^"]*)"', html))
    assert keys["metrics.champion"] == metrics["champion"]
    assert keys["registry.alias"] == registry["decision"]["alias"]
    assert keys["registry.candidate.version"] == str(registry["candidate"]["version"])
    assert keys["registry.promote"] == str(registry["decision"]["promote"]).lower()
    assert remote_assets(html) == [] and missing_local_assets(html, page) == []
    local_links = [href for href in re.findall(r'<a href="([^"]+)"', html) if not href.startswith("http")]
    assert len(local_links) == 2 and all((page.parent / href).is_file() for href in local_links)  # Data Docs, Evidently
    dom = dump_dom(page, tmp_path)
    assert dom.count("<svg") >= 2  # gains and calibration
    assert coloured_share(screenshot(page, tmp_path, "report", size="1280,3000")) > 0.02


def test_changing_one_model_reruns_only_its_branch(reproduced: Path) -> None:
    original = set_param(reproduced, "train", "historical", {"window_days": 90})
    try:
        rerun = run_in(reproduced, "dvc", "repro")
    finally:
        (reproduced / "params.yaml").write_text(original)
    ran = {line.split("'")[1] for line in rerun.stdout.splitlines() if line.startswith("Running stage")}
    # No other model retrains; package and monitor follow only if the registry record changed; the report
    # page shows the new metrics.
    assert {"train@historical", "evaluate", "register", "report"} <= ran <= {
        "train@historical", "evaluate", "register", "package", "monitor", "report"}, rerun.stdout
    run_in(reproduced, "dvc", "repro")  # back to the committed params


def test_second_repro_is_a_noop(reproduced: Path) -> None:
    started = time.perf_counter()
    second = run_in(reproduced, "dvc", "repro")
    elapsed = time.perf_counter() - started
    assert "Data and pipelines are up to date" in second.stdout
    assert "Running stage" not in second.stdout
    status = run_in(reproduced, "dvc", "status")
    assert "up to date" in status.stdout
    print(f"second dvc repro: {elapsed:.1f} s")  # reported, not asserted (shared machines are noisy)


def test_failed_gate_leaves_last_good_features_untouched(reproduced: Path) -> None:
    features = reproduced / "data/features/eval.parquet"
    before = _digest(features)
    # `dvc repro` takes no -S: edit params.yaml as a user would.
    original = set_param(reproduced, "validate", "min_users", 100_000_000)
    try:
        failed = run_in(reproduced, "dvc", "repro", check=False)
    finally:
        (reproduced / "params.yaml").write_text(original)
    assert failed.returncode != 0
    assert "validate.min_users" in failed.stdout + failed.stderr
    assert _digest(features) == before
    assert (reproduced / "data/validated.parquet").is_file()  # the last good output is still there
    summary = json.loads((reproduced / "reports/validation/summary.json").read_text())
    assert summary["success"] is False
    run_in(reproduced, "dvc", "repro")  # back to green
    assert _digest(features) == before


def test_exp_run_with_synthetic_source(reproduced: Path) -> None:
    # The recommenders that need training (nextitem, taste) left out (`~` removes a key): the CDNOW repro and
    # the served project train them; this run is about the source.
    # With item titles (issue 23): embed_items embeds them with the shipped model, offline, featurize joins
    # the pooled text columns, and gbdt and mlp (its text tower) train on them.
    run_in(reproduced, "dvc", "exp", "run", "-S", "data.source=synthetic", "-S", "data.synthetic.users=2000",
         "-S", "data.synthetic.events_per_user=40", "-S", "train.models=[historical,gbdt,mlp]",
         "-S", "+data.synthetic.titles={words: 12, value_words: 2, words_per_title: 2}",
         "-S", "~recs.models.nextitem", "-S", "~recs.models.taste")
    embedded = json.loads((reproduced / "reports/embed_items.json").read_text())
    assert embedded["texts"] > 0 and embedded["items"] > 0
    meta = json.loads((reproduced / "data/features/meta.json").read_text())
    text_columns = meta["spec"]["text_columns"]
    assert text_columns and all(c.startswith("text_") for c in text_columns)
    recs = json.loads((reproduced / "reports/recs_metrics.json").read_text())
    assert set(recs["models"]) == {"popularity", "cooccurrence"} and recs["users"] > 0
    truth = json.loads((reproduced / "data/truth/truth.json").read_text())
    assert truth["planted"] is True and truth["params"]["users"] == 2000
    evaluation = pd.read_parquet(reproduced / "data/features/eval.parquet")
    assert 1000 < len(evaluation) <= 2000 and evaluation["user_id"].str.startswith("u").all()
    report = json.loads((reproduced / "reports/metrics.json").read_text())
    assert set(report["models"]) == {"historical", "gbdt", "mlp"} and report["users"] == len(evaluation)
    assert set(text_columns) <= set(evaluation.columns)
    from uservalue.models.catalog import load_model
    from uservalue.models.deep.layers import TextSplitTower

    mlp = load_model(reproduced / "models/mlp/model")
    assert mlp.spec.text_columns == tuple(text_columns) and isinstance(mlp.network.tower, TextSplitTower)
    shown = json.loads(run_in(reproduced, "dvc", "exp", "show", "--json").stdout)
    assert json.dumps(shown).count("synthetic") >= 1


def test_editing_library_code_a_stage_runs_makes_it_stale(reproduced: Path) -> None:
    """DVC's deps cover the library modules, not only the entry scripts."""
    cases = {
        "src/uservalue/features/sql.py": {"featurize"},  # the feature definition
        "src/uservalue/lifecycle/registry.py": {"register", "package", "monitor"},
        "src/uservalue/cli/common.py": {"ingest", "validate", "featurize", "evaluate", "register", "package",
                                        "monitor"},
    }
    for path, expected in cases.items():
        source = reproduced / path
        original = source.read_text()
        source.write_text(original + "\n# an edit\n")
        try:
            status = run_in(reproduced, "dvc", "status", "--json").stdout
        finally:
            source.write_text(original)
        stale = set(json.loads(status))
        assert expected <= stale, (path, stale)
    assert json.loads(run_in(reproduced, "dvc", "status", "--json").stdout) == {}


@pytest.mark.parametrize(("bentofile", "exit_code"), [
    ("labels: {}\n", 2),  # no service: bad configuration, final
    ('service: "no_such_module:Service"\npython:\n  lock_packages: false\n', 75),  # the build fails: retry
])
def test_package_failures_exit_2_when_final_and_75_when_a_retry_may_help(
        reproduced: Path, tmp_path: Path, bentofile: str, exit_code: int) -> None:
    broken = reproduced / "broken-bentofile.yaml"
    broken.write_text(bentofile)
    record = reproduced / "reports/package.json"
    before = record.read_text()
    try:
        done = run_in(reproduced, "python", "pipelines/package.py", "--bentofile", str(broken), "--out",
                      str(record), check=False)
    finally:
        broken.unlink()
    assert done.returncode == exit_code, done.stderr
    assert "Traceback" not in done.stderr
    assert record.read_text() == before  # the last good record stays
