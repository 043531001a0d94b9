"""The register stage: the evaluation champion becomes a new registry version and takes the alias
`champion` only through the gate (see `decide`; both models scored on today's holdout by
evaluate.score_model), else `challenger`. One alias update: never a registry without a champion."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from uservalue.config import MetricBound, RegisterParams
from uservalue.errors import InputError
from uservalue.features.store import read_features
from uservalue.io import write_json
from uservalue.lifecycle import metrics
from uservalue.lifecycle.context import StageContext
from uservalue.lifecycle.evaluate import score_model, unmet_requirements
from uservalue.lifecycle.tracking import current_alias, version_for_run
from uservalue.models.base import ModelInfo
from uservalue.models.catalog import load_model

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def decide(candidate: dict[str, float], champion: dict[str, float] | None, cfg: RegisterParams,
           requirements: Mapping[str, MetricBound] | None = None) -> GateDecision:
    """Pure gate logic: promote when the primary metric improves by min_delta, no guard metric is
    worse than its tolerance (all compared as 'higher is better' scores), and the candidate meets the
    absolute requirements (evaluate.requirements) whenever the champion does."""
    unmet = unmet_requirements(candidate, requirements or {})
    if champion is None:
        return GateDecision(True, ["no champion yet", *(f"requirement {reason}" for reason in unmet)])
    reasons: list[str] = []
    if unmet and not unmet_requirements(champion, requirements or {}):
        reasons.extend(f"requirement {reason} (the champion meets it)" for reason in unmet)
    primary = cfg.primary_metric
    gain = metrics.score(primary, candidate[primary]) - metrics.score(primary, champion[primary])
    promote = gain >= cfg.min_delta and gain > 0 and not reasons
    reasons.append(
        f"{primary}: candidate {candidate[primary]:.4f} vs champion {champion[primary]:.4f} "
        f"(improvement {gain:+.4f}, required > 0 and >= {cfg.min_delta})"
    )
    for metric, tolerance in cfg.guards.items():
        loss = metrics.score(metric, champion[metric]) - metrics.score(metric, candidate[metric])
        if loss > tolerance:
            promote = False
            reasons.append(f"guard {metric}: candidate {candidate[metric]:.4f} vs champion "
                           f"{champion[metric]:.4f} is worse by {loss:.4f} > tolerance {tolerance}")
    return GateDecision(promote, reasons)


def load_version(name: str, version: str) -> Any:
    """The ValueModel of a registry version, loaded from its artifact (the model inside the pyfunc)."""
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    return load_model(local / "artifacts" / "model")


def run_register(ctx: StageContext, metrics_path: str | Path, models_dir: str | Path, features_dir: str | Path,
                 out_path: str | Path) -> dict[str, Any]:
    params = ctx.params
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

    ctx.tracking()
    client = mlflow.MlflowClient()
    version = version_for_run(client, name, run["run_id"], run["model_uri"])
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
        champion_metrics = (score_model(load_version(name, champion.version), features, f"models:/{name}/{champion.version}")[1]
                            if champion else None)
        decision = decide(candidate_metrics, champion_metrics, cfg, params.evaluate.requirements)
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
        "requirements": {m: b.model_dump() for m, b in params.evaluate.requirements.items()},
    }
    write_json(out_path, record)
    return record


def registered_version(ctx: StageContext, alias: str = CHAMPION) -> Any:
    """The model version behind `models:/<register.model_name>@<alias>` (an error if there is none)."""
    ctx.tracking()
    name = ctx.params.register_.model_name
    version = current_alias(mlflow.MlflowClient(), name, alias)
    if version is None:
        raise InputError(f"models:/{name}@{alias}", "no such registered model version",
                         expected="a model promoted by the register stage")
    return version


def load_registered(ctx: StageContext, alias: str = CHAMPION) -> tuple[Any, ModelInfo]:
    """(ValueModel, ModelInfo) of `models:/<register.model_name>@<alias>`, as the service loads it."""
    version = registered_version(ctx, alias)
    name = ctx.params.register_.model_name
    model = load_version(name, str(version.version))
    return model, ModelInfo(name=name, version=str(version.version), run_id=version.run_id,
                            model_type=version.tags.get("model", ""))
