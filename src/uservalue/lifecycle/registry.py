"""The register stage: a gated promotion in the MLflow model registry.

The evaluation champion is registered as a new version of `register.model_name`. It takes the
alias `champion` only when it beats the current champion *on the same evaluation set* (the
current champion is re-scored on today's evaluation features, so a change of data never compares
figures from two different holdouts) by `register.min_delta` on the primary metric, with no guard
metric worse than its tolerance. Otherwise it gets the alias `challenger`.

The switch is one `set_registered_model_alias` call, and nothing ever removes `champion` first,
so a failed or killed run leaves the previous champion in place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from uservalue.lifecycle import metrics, tracking
from uservalue.config import Params, RegisterParams
from uservalue.errors import InputError
from uservalue.lifecycle.evaluate import score
from uservalue.io import write_json
from uservalue.lifecycle.train import read_features

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def decide(candidate: dict[str, float], champion: dict[str, float] | None, cfg: RegisterParams) -> GateDecision:
    """Pure gate logic: promote when the primary metric improves by min_delta and no guard
    metric is worse than its tolerance (all compared as 'higher is better' scores)."""
    if champion is None:
        return GateDecision(True, ["no champion yet"])
    reasons: list[str] = []
    primary = cfg.primary_metric
    gain = score(primary, candidate[primary]) - score(primary, champion[primary])
    promote = gain >= cfg.min_delta and gain > 0
    reasons.append(
        f"{primary}: candidate {candidate[primary]:.4f} vs champion {champion[primary]:.4f} "
        f"(improvement {gain:+.4f}, required > 0 and >= {cfg.min_delta})"
    )
    for metric, tolerance in cfg.guards.items():
        loss = score(metric, champion[metric]) - score(metric, candidate[metric])
        if loss > tolerance:
            promote = False
            reasons.append(f"guard {metric}: candidate {candidate[metric]:.4f} vs champion "
                           f"{champion[metric]:.4f} is worse by {loss:.4f} > tolerance {tolerance}")
    return GateDecision(promote, reasons)


def current_alias(client: mlflow.MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _version_for_run(client: mlflow.MlflowClient, name: str, run_id: str, model_uri: str) -> Any:
    """Re-running register for the same training run reuses its version (idempotent)."""
    try:
        existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        existing = []
    if existing:
        return max(existing, key=lambda v: int(v.version))
    return mlflow.register_model(model_uri, name)


def rescore(model_uri: str, features: Any) -> dict[str, float]:
    """Metrics of a registered model on the given evaluation features (its pyfunc, as served)."""
    model = mlflow.pyfunc.load_model(model_uri)
    predicted = model.predict(tracking.to_model_input(features))
    return metrics.value_metrics(
        features["value"].to_numpy(dtype="float64"),
        predicted["expected_value"].to_numpy(dtype="float64"),
        features["bought"].to_numpy(dtype=bool),
        predicted["p_buy"].to_numpy(dtype="float64"),
    )


def run_register(
    params: Params,
    metrics_path: str | Path,
    models_dir: str | Path,
    features_dir: str | Path,
    out_path: str | Path,
    project_dir: str | Path = ".",
) -> dict[str, Any]:
    metrics_path, models_dir = Path(metrics_path), Path(models_dir)
    if not metrics_path.is_file():
        raise InputError(metrics_path, "evaluation metrics are missing", expected="the evaluate stage's output")
    report = json.loads(metrics_path.read_text())
    candidate_name = report["champion"]
    candidate_metrics = report["models"][candidate_name]
    run = json.loads((models_dir / candidate_name / "run.json").read_text())
    features = read_features(Path(features_dir), "eval")
    cfg = params.register_
    name = cfg.model_name

    tracking.configure(params.tracking, project_dir)
    client = mlflow.MlflowClient()
    version = _version_for_run(client, name, run["run_id"], run["model_uri"])
    for key, value in {
        "model": candidate_name,
        "eval_cutoff": report.get("eval_cutoff", ""),
        "features_md5": report.get("features_md5", ""),
        **{f"eval_{k}": f"{v:.6g}" for k, v in candidate_metrics.items()},
    }.items():
        client.set_model_version_tag(name, version.version, key, str(value))

    champion = current_alias(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(version.version):
        decision, champion_metrics = GateDecision(False, ["the candidate is already the champion"]), candidate_metrics
    else:
        champion_metrics = rescore(f"models:/{name}/{champion.version}", features) if champion else None
        decision = decide(candidate_metrics, champion_metrics, cfg)
        # One alias update: the registry is never without a champion.
        client.set_registered_model_alias(name, CHAMPION if decision.promote else CHALLENGER, version.version)
    champion_now = current_alias(client, name, CHAMPION)
    record = {
        "model_name": name,
        "candidate": {"model": candidate_name, "version": str(version.version), "run_id": run["run_id"],
                      "metrics": candidate_metrics},
        "previous_champion": ({"version": str(champion.version), "run_id": champion.run_id, "metrics": champion_metrics}
                              if champion is not None else None),
        "decision": {**asdict(decision),
                     "alias": CHAMPION if champion_now and str(champion_now.version) == str(version.version)
                     else CHALLENGER},
        "champion_version": str(champion_now.version) if champion_now else None,
        "primary_metric": cfg.primary_metric,
        "min_delta": cfg.min_delta,
        "guards": dict(cfg.guards),
    }
    write_json(out_path, record)
    return record


def registered_version(params: Params, project_dir: str | Path = ".", alias: str = CHAMPION) -> Any:
    """The model version behind `models:/<register.model_name>@<alias>` (an error if there is none)."""
    tracking.configure(params.tracking, project_dir)
    name = params.register_.model_name
    version = current_alias(mlflow.MlflowClient(), name, alias)
    if version is None:
        raise InputError(f"models:/{name}@{alias}", "no such registered model version",
                         expected="a model promoted by the register stage")
    return version


def load_registered(params: Params, project_dir: str | Path = ".", alias: str = CHAMPION) -> tuple[Any, Any]:
    """(ValueModel, ModelInfo) of `models:/<register.model_name>@<alias>`, loaded directly from its
    artifact (the saved ValueModel inside the pyfunc), as the service loads it."""
    from uservalue.models import load_model
    from uservalue.models.base import ModelInfo

    version = registered_version(params, project_dir, alias)
    name = params.register_.model_name
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}"))
    model = load_model(local / "artifacts" / "model")
    return model, ModelInfo(name=name, version=str(version.version), run_id=version.run_id,
                            model_type=version.tags.get("model", ""))
