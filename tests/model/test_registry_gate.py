"""Train -> evaluate -> register against a real MLflow (SQLite backend, local artifacts).

The gate: the first model becomes champion; a worse one becomes challenger; a better one takes
champion; a run that fails half-way leaves the champion where it was."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.conftest import merge
from uservalue.config import MetricBound, MetricTarget, RegisterParams, parse_params
from uservalue.lifecycle.context import StageContext
from uservalue.lifecycle.evaluate import (
    choose_champion,
    run_evaluate,
    score_model,
    targets_markdown,
)
from uservalue.lifecycle.registry import CHALLENGER, CHAMPION, decide, load_version, run_register
from uservalue.lifecycle.tracking import GIT_COMMIT_TAG
from uservalue.lifecycle.train import train_model

MODEL_NAME = "user-value"


class Project:
    """A project directory with its own MLflow store; one train/evaluate/register cycle per call."""

    def __init__(self, root: Path, repo_params: dict, features_dir: Path) -> None:
        self.root, self.repo_params, self.features_dir = root, repo_params, features_dir
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        # A git repository, so runs record the code's commit.
        for args in (["init", "-q"], ["-c", "user.name=ci", "-c", "user.email=ci@example.invalid",
                                      "commit", "-q", "--allow-empty", "-m", "project"]):
            subprocess.run(["git", *args], cwd=root, check=True)
        self.commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True,
                                     text=True).stdout.strip()

    def context(self, model: str, model_params: dict | None = None) -> StageContext:
        return StageContext(self.root, parse_params(merge(self.repo_params, {
            "train.models": [model],
            f"train.{model}": model_params or {},
            "tracking.uri": self.uri,
            "tracking.artifact_location": (self.root / "artifacts").as_uri(),
        })))

    def cycle(self, model: str, model_params: dict | None = None, features_dir: Path | None = None) -> dict:
        ctx = self.context(model, model_params)
        features_dir = features_dir or self.features_dir
        models_dir = self.root / "models"
        train_model(ctx, model, self.features_dir, models_dir / model)
        run_evaluate(ctx, self.features_dir, models_dir, self.root / "metrics.json", self.root / "plots",
                     self.root / "comparison.md", self.root / "predictions.parquet")
        return run_register(ctx, self.root / "metrics.json", models_dir, features_dir, self.root / "registry.json")

    def client(self) -> mlflow.MlflowClient:
        mlflow.set_tracking_uri(self.uri)
        return mlflow.MlflowClient()

    def alias(self, alias: str) -> str:
        return str(self.client().get_model_version_by_alias(MODEL_NAME, alias).version)


@pytest.fixture(scope="module")
def project(tmp_path_factory, repo_params, cdnow_features) -> Project:
    return Project(tmp_path_factory.mktemp("registry"), repo_params, cdnow_features.directory)


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_gate_sequence_first_worse_better(project: Project, cdnow_features) -> None:
    # 1. The first model becomes champion.
    first = project.cycle("historical", {"window_days": 90})
    assert first["decision"]["alias"] == CHAMPION and first["decision"]["reasons"][0] == "no champion yet"
    assert project.alias(CHAMPION) == first["candidate"]["version"] == "1"

    # 2. A worse one becomes challenger; the champion stays.
    worse = project.cycle("historical", {"window_days": 7})
    assert worse["candidate"]["metrics"]["gini"] < first["candidate"]["metrics"]["gini"]
    assert worse["decision"]["alias"] == CHALLENGER and worse["decision"]["promote"] is False
    assert project.alias(CHAMPION) == "1" and project.alias(CHALLENGER) == worse["candidate"]["version"]
    # The champion was re-scored on the same evaluation set through the same scoring function as
    # `evaluate`: its gate figures equal its own evaluation exactly, every metric.
    assert worse["previous_champion"]["metrics"] == first["candidate"]["metrics"]

    # 3. A better one takes champion.
    better = project.cycle("gbdt", {"max_rounds": 80, "early_stopping_rounds": 10})
    assert better["candidate"]["metrics"]["gini"] > first["candidate"]["metrics"]["gini"]
    assert better["decision"]["alias"] == CHAMPION
    assert project.alias(CHAMPION) == better["candidate"]["version"] == "3"
    assert project.alias(CHALLENGER) == worse["candidate"]["version"]

    # Registering the same run again is idempotent: same version, still champion.
    again = run_register(project.context("gbdt"), project.root / "metrics.json", project.root / "models",
                         project.features_dir, project.root / "registry.json")
    assert again["candidate"]["version"] == "3" and again["decision"]["alias"] == CHAMPION

    # The champion is an MLflow model any consumer loads by alias: predictions plus influence.
    served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@{CHAMPION}")
    from uservalue.models.model_input import to_model_input

    out = served.predict(to_model_input(cdnow_features.eval.head(50)))
    assert {"user_id", "p_buy", "expected_value", "influence_buy"} <= set(out.columns)
    assert served.metadata.signature is not None


def test_failed_register_leaves_the_champion_in_place(project: Project, cdnow_features, tmp_path: Path) -> None:
    champion_before = project.alias(CHAMPION)
    # Evaluation features without a column the champion needs: re-scoring it fails half-way.
    broken = tmp_path / "features"
    broken.mkdir()
    (broken / "meta.json").write_text((cdnow_features.directory / "meta.json").read_text())
    cdnow_features.eval.drop(columns=["monetary_sum_365d", "buy_count_90d"]).to_parquet(broken / "eval.parquet")
    with pytest.raises(Exception, match="monetary_sum_365d|buy_count_90d"):
        project.cycle("historical", {"window_days": 30}, features_dir=broken)
    assert project.alias(CHAMPION) == champion_before


def test_training_run_records_code_data_and_model(project: Project) -> None:
    record = json.loads((project.root / "models" / "historical" / "run.json").read_text())
    run = project.client().get_run(record["run_id"])
    assert run.data.tags["stage"] == "train" and run.data.tags["model"] == "historical"
    assert run.data.tags[GIT_COMMIT_TAG] == project.commit
    assert run.data.params["train.historical.window_days"] == "30"
    assert "eval_gini" in run.data.metrics  # evaluation writes back to the training run
    logged = mlflow.models.get_model_info(record["model_uri"])
    assert logged.signature is not None and "expected_value" in str(logged.signature.outputs)


def test_gate_scores_a_registered_version_as_evaluate_scored_it(project: Project, cdnow_features) -> None:
    """The gate re-scores the champion from the registry; the candidate's evaluate metrics come from
    its local model directory. One scoring function: the same version gives the same figures."""
    candidate = json.loads((project.root / "registry.json").read_text())["candidate"]  # metrics: evaluate's
    _, gate_metrics = score_model(load_version(MODEL_NAME, candidate["version"]), cdnow_features.eval)
    assert gate_metrics == candidate["metrics"]


def test_gbdt_run_logs_the_influence_table(project: Project) -> None:
    record = json.loads((project.root / "models" / "gbdt" / "run.json").read_text())
    influence = mlflow.artifacts.load_dict(f"runs:/{record['run_id']}/influence.json")
    assert influence == json.loads((project.root / "models" / "gbdt" / "influence.json").read_text())
    assert set(influence["share"]) == {"view", "fav", "cart", "buy"}
    assert sum(influence["share"].values()) == pytest.approx(1.0)
    # CDNOW has purchases only: no effect for the behaviours the model never saw, all of the share to buy.
    assert influence["effect"] == {"view": None, "fav": None, "cart": None}
    assert influence["share"]["buy"] == pytest.approx(1.0)
    run = mlflow.get_run(record["run_id"])
    assert run.data.metrics["influence_share_buy"] == pytest.approx(1.0)


GATE = RegisterParams(primary_metric="gini", min_delta=0.01, guards={"auc": 0.01, "total_error": 0.05})
BASE = {"gini": 0.70, "spearman": 0.45, "mae": 36, "rmse": 97, "top_decile_capture": 0.52, "decile_mape": 0.2,
        "total_error": 0.02, "auc": 0.77}


@pytest.mark.parametrize(
    ("changes", "promote"),
    [
        ({"gini": 0.715}, True),  # beats by more than min_delta
        ({"gini": 0.705}, False),  # better, but by less than min_delta
        ({"gini": 0.69}, False),  # worse
        ({"gini": 0.75, "auc": 0.75}, False),  # primary better, guard auc worse than its tolerance
        ({"gini": 0.75, "auc": 0.765}, True),  # guard worse but within tolerance
        ({"gini": 0.75, "total_error": -0.08}, False),  # |total_error| 0.08 vs 0.02: worse by 0.06 > 0.05
        ({"gini": 0.75, "total_error": -0.01}, True),  # closer to 0 is better whatever the sign
    ],
)
def test_decide(changes: dict, promote: bool) -> None:
    decision = decide({**BASE, **changes}, BASE, GATE)
    assert decision.promote is promote, decision.reasons


def test_decide_without_champion_promotes() -> None:
    assert decide(BASE, None, GATE).promote


REQUIREMENTS = {"decile_mape": MetricBound(target=0.30, direction="max"),
                "total_error": MetricBound(target=0.10, direction="abs")}


@pytest.mark.parametrize(
    ("candidate", "champion", "promote"),
    [
        ({"gini": 0.75, "decile_mape": 0.35}, {}, False),  # better ranking, deciles off: the champion meets them
        ({"gini": 0.75, "total_error": -0.12}, {}, False),  # |total error| beyond 10 %, whatever the sign
        ({"gini": 0.75, "decile_mape": 0.35}, {"decile_mape": 0.40}, True),  # neither meets it: not a blocker
        ({"gini": 0.75, "decile_mape": 0.29, "total_error": 0.05}, {}, True),
    ],
)
def test_decide_requirements(candidate: dict, champion: dict, promote: bool) -> None:
    decision = decide({**BASE, **candidate}, {**BASE, **champion}, GATE, REQUIREMENTS)
    assert decision.promote is promote, decision.reasons
    if not promote:
        assert any("requirement" in reason for reason in decision.reasons)


def test_first_model_is_champion_even_if_it_misses_a_requirement() -> None:
    decision = decide({**BASE, "decile_mape": 0.5}, None, GATE, REQUIREMENTS)
    assert decision.promote
    assert any("decile_mape 0.5000 misses max 0.3" in reason for reason in decision.reasons)


def test_champion_is_best_ranking_among_calibrated_models() -> None:
    # The CDNOW run of issue 16: mlp ranks best but its deciles are 35 % off.
    table = {"mlp": {**BASE, "gini": 0.721, "decile_mape": 0.353, "total_error": -0.081},
             "sequence": {**BASE, "gini": 0.720, "decile_mape": 0.281, "total_error": 0.057},
             "gbdt": {**BASE, "gini": 0.710, "decile_mape": 0.165, "total_error": 0.088}}
    choice = choose_champion(table, "gini", REQUIREMENTS)
    assert (choice.champion, choice.eligible, choice.requirements_met) == ("sequence", ["sequence", "gbdt"], True)
    assert choose_champion(table, "gini").champion == "mlp"  # no requirements: ranking alone
    strict = {"decile_mape": MetricBound(target=0.1, direction="max")}
    fallback = choose_champion(table, "gini", strict)  # nobody qualifies: best by gini, flagged
    assert (fallback.champion, fallback.eligible, fallback.requirements_met) == ("mlp", [], False)


def test_comparison_table_marks_every_model_against_the_targets() -> None:
    targets = {"gini": MetricTarget(target=0.73, direction="min", anchor=0.712),
               "decile_mape": MetricTarget(target=0.10, direction="max", anchor=0.149),
               "total_error": MetricTarget(target=0.03, direction="abs", anchor=-0.011)}
    table = {"mlp": {**BASE, "gini": 0.721, "decile_mape": 0.353, "total_error": -0.081},
             "ensemble": {**BASE, "gini": 0.7237, "decile_mape": 0.2105, "total_error": -0.0169}}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in targets_markdown(table, targets).splitlines()
            if line.startswith("| ")}
    assert rows["gini"] == "| gini | 0.712 | >= 0.73 | 0.7210 ✗ | 0.7237 ✗ |"
    assert rows["total_error"] == "| total_error | -0.011 | within ±0.03 | -0.0810 ✗ | -0.0169 ✓ |"
    assert rows["met"] == "| met | | | 0/3 | 1/3 |"
    assert targets_markdown(table, {}) == ""  # no targets (a project of its own): no section


def test_lower_is_better_primary_metric() -> None:
    gate = RegisterParams(primary_metric="rmse", min_delta=1.0, guards={})
    assert decide({**BASE, "rmse": 95.5}, BASE, gate).promote
    assert not decide({**BASE, "rmse": 96.5}, BASE, gate).promote


def test_predictions_file_has_every_model_and_user(project: Project, cdnow_features) -> None:
    predictions = pd.read_parquet(project.root / "predictions.parquet")
    assert set(predictions.columns) >= {"model", "user_id", "p_buy", "expected_value", "value", "bought"}
    assert len(predictions) == len(cdnow_features.eval) * predictions["model"].nunique()


class _Interrupt(KeyboardInterrupt):
    """What Ctrl-C or a killed Airflow task looks like to the training loop."""


@pytest.mark.slow  # two real training runs, one interrupted
def test_interrupted_training_resumes_from_its_checkpoint(project: Project) -> None:
    ctx = project.context("mlp", {"max_epochs": 4, "patience": 10})
    out = project.root / "models" / "mlp"

    def stop_after_second_epoch(metrics: dict, step: int) -> None:
        if step == 2:
            raise _Interrupt

    with pytest.raises(KeyboardInterrupt):
        train_model(ctx, "mlp", project.features_dir, out, log_metrics_hook=stop_after_second_epoch)
    assert not out.exists()  # nothing half-written where the stage output goes
    assert any((project.root / ".cache" / "checkpoints" / "mlp").iterdir())
    client = project.client()
    interrupted = client.search_runs([client.get_experiment_by_name("uservalue").experiment_id],
                                     "tags.model = 'mlp'", order_by=["attributes.start_time DESC"])[0]
    assert interrupted.info.status in ("FAILED", "KILLED")

    resumed = train_model(ctx, "mlp", project.features_dir, out)
    assert resumed.summary["resumed_from_epoch"] == 2
    steps = [m.step for m in client.get_metric_history(resumed.run_id, "train_loss")]
    assert steps == [3, 4]  # only the epochs that were left
    assert (out / "model" / "model.json").is_file()
