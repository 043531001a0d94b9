"""The recommender's registry model (params recs.model_name, `user-recs`): aliases and gate as for the value
model (uservalue.lifecycle.registry), with the recommender's metrics (all higher-is-better)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from uservalue.config import RecsParams
from uservalue.lifecycle.context import StageContext
from uservalue.lifecycle.tracking import current_alias, version_for_run
from uservalue.recs.base import Recommender, load_recommender

# The aliases of uservalue.lifecycle.registry (not imported from it: the recommender's stage does not run the
# value models' code, so DVC does not re-run it when that changes).
CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def decide_recs(candidate: dict[str, float], champion: dict[str, float] | None, cfg: RecsParams) -> GateDecision:
    """The gate of the recommender: every recs metric is higher-is-better (recs.primary_metric, min_delta, guards)."""
    if champion is None:
        return GateDecision(True, ["no champion yet"])
    primary = cfg.primary_metric
    gain = candidate[primary] - champion[primary]
    promote = gain >= cfg.min_delta and gain > 0
    reasons = [(f"{primary}: candidate {candidate[primary]:.4f} vs champion {champion[primary]:.4f} "
                f"(improvement {gain:+.4f}, required > 0 and >= {cfg.min_delta})")]
    for metric, tolerance in cfg.guards.items():
        loss = champion[metric] - candidate[metric]
        if loss > tolerance:
            promote = False
            reasons.append(f"guard {metric}: candidate {candidate[metric]:.4f} vs champion "
                           f"{champion[metric]:.4f} is worse by {loss:.4f} > tolerance {tolerance}")
    return GateDecision(promote, reasons)


def load_recs_version(name: str, version: str) -> Recommender:
    """The Recommender of a registry version of the recommender, from its artifact."""
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    return load_recommender(local / "artifacts" / "model")


def register_recs(ctx: StageContext, cutoff: dt.datetime, candidate_name: str, candidate_metrics: dict[str, float], run_id: str,
                  model_uri: str, rescore: Callable[[Recommender], dict[str, float]]) -> dict[str, Any]:
    """Register the best recommender as a version of recs.model_name; it takes alias `champion` only through
    the gate (the champion rescored by `rescore` on today's split), else `challenger`. The decision record."""
    cfg = ctx.params.recs
    name = cfg.model_name
    ctx.tracking()
    client = mlflow.MlflowClient()
    version = version_for_run(client, name, run_id, model_uri)
    for key, value in {"model": candidate_name, "eval_cutoff": cutoff.isoformat(),
                       **{f"eval_{k}": f"{v:.6g}" for k, v in candidate_metrics.items()}}.items():
        client.set_model_version_tag(name, version.version, key, str(value))
    champion = current_alias(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(version.version):
        decision, champion_metrics = GateDecision(False, ["the candidate is already the champion"]), candidate_metrics
    else:
        champion_metrics = rescore(load_recs_version(name, str(champion.version))) if champion else None
        decision = decide_recs(candidate_metrics, champion_metrics, cfg)
        client.set_registered_model_alias(name, CHAMPION if decision.promote else CHALLENGER, version.version)
    champion_now = current_alias(client, name, CHAMPION)
    return {
        "model_name": name,
        "candidate": {"model": candidate_name, "version": str(version.version), "run_id": run_id,
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


def registered_recs_version(ctx: StageContext, alias: str = CHAMPION) -> Any | None:
    """The version behind `models:/<recs.model_name>@<alias>`, None when there is none."""
    ctx.tracking()
    return current_alias(mlflow.MlflowClient(), ctx.params.recs.model_name, alias)
