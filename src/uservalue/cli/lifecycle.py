"""Commands of the lifecycle stages: train, evaluate, register, package, monitor, batch `score`, and `tune`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from uservalue.cli import common
from uservalue.cli.common import (
    FeaturesDirOption,
    ModelsDirOption,
    ParamsOption,
    err,
    load,
    path_option,
    progress_bar,
)
from uservalue.errors import EXIT_DRIFT, ConfigError, InputError

F = TypeVar("F", bound=Callable[..., Any])

if TYPE_CHECKING:
    from uservalue.lifecycle.context import StageContext


def stage_context(params: Path, overrides: dict[str, Any] | None = None) -> StageContext:
    """The StageContext of a lifecycle command: the working directory is the project."""
    from uservalue.lifecycle.context import StageContext

    return StageContext(root=Path.cwd(), params=load(params, overrides))


def is_store_failure(error: BaseException) -> bool:
    """MLflow's tracking or registry store failed (a retry may help)."""
    from uservalue.lifecycle.tracking import is_store_failure as store_failure

    return store_failure(error)


def reports_errors(command: F) -> F:
    """The CLI's error reporting, with MLflow store failures as transient (exit 75)."""
    return common.reports_errors(command, transient=is_store_failure)  # type: ignore[arg-type]


@reports_errors
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to train (one of params train.models' names).")],
    params: ParamsOption = Path("params.yaml"),
    features_dir: FeaturesDirOption = Path("data/features"),
    out_dir: Path = path_option("models/<model>", "Directory for the model, run.json and influence.json."),
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (overrides train.device).")] = None,
) -> None:
    """Fit one model on the training cutoffs and track the run in MLflow (params `train`, `tracking`)."""
    from uservalue.config import MODEL_NAMES
    from uservalue.lifecycle.train import train_model

    if model not in MODEL_NAMES:
        raise ConfigError(f"--model: unknown model '{model}'; known: {list(MODEL_NAMES)}")
    ctx = stage_context(params, {"train.device": device})
    target = Path(str(out_dir).replace("<model>", model))
    with progress_bar() as progress:
        task = progress.add_task(f"train {model}", total=None)

        def epoch_done(metrics: dict[str, float], step: int) -> None:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            progress.update(task, description=f"train {model} epoch {step}: {shown}")

        result = train_model(ctx, model, features_dir, target, log_metrics_hook=epoch_done)
    influence = ", ".join(f"{k}={v:.3f}" for k, v in (result.influence or {}).items())
    err.print(f"train {model}: {result.seconds:.1f} s, run {result.run_id}" + (f", influence {influence}" if influence else ""),
              markup=False)


@reports_errors
def tune(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to tune (a key of params tune.space).")],
    params: ParamsOption = Path("params.yaml"),
    features_dir: FeaturesDirOption = Path("data/features"),
    trials: Annotated[int | None, typer.Option(min=1, help="Trials (overrides tune.trials).")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="Stop starting trials after this many seconds.")] = None,
    out: Path = path_option("reports/tune/<model>.json", "Summary: best params, metric, MLflow parent run."),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the best params; leave params.yaml as it is.")] = False,
) -> None:
    """Search a model's hyperparameters on the training cutoffs (Optuna; params `tune`), each trial a nested
    MLflow run; write the best into train.<model> of params.yaml, so the next `dvc repro` uses them."""
    from uservalue.lifecycle.tune import tune_model, write_best_params, write_summary

    result = tune_model(stage_context(params), model, features_dir, trials=trials, timeout_s=timeout_s)
    write_summary(Path(str(out).replace("<model>", model)), result)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best_params.items())
    err.print(f"tune {model}: best {result.metric}={result.best_value:.4f} of {result.trials} trials in "
              f"{result.seconds:.0f} s (MLflow run {result.parent_run_id}): {shown}", markup=False)
    if not dry_run:
        write_best_params(params, result)
        err.print(f"tune {model}: written to train.{model} in {params}; `dvc repro` retrains with them", markup=False)


@reports_errors
def evaluate(
    params: ParamsOption = Path("params.yaml"),
    features_dir: FeaturesDirOption = Path("data/features"),
    models_dir: ModelsDirOption = Path("models"),
    metrics_out: Path = path_option("reports/metrics.json", "Metrics JSON of every model."),
    plots_dir: Path = path_option("reports/plots", "Plot data (gains, decile calibration)."),
    table_out: Path = path_option("reports/model_comparison.md", "Markdown comparison table."),
    predictions_out: Path = path_option("data/predictions/eval.parquet", "Per-user predictions of every model."),
) -> None:
    """Score every trained model on the evaluation cutoff; pick the champion (params `evaluate`)."""
    from uservalue.lifecycle.evaluate import run_evaluate

    report = run_evaluate(stage_context(params), features_dir, models_dir, metrics_out, plots_dir, table_out,
                          predictions_out)
    primary = report["primary_metric"]
    for name, row in report["models"].items():
        err.print(f"evaluate {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()), markup=False)
    err.print(f"evaluate: champion by {primary}: {report['champion']}", markup=False)


@reports_errors
def register(
    params: ParamsOption = Path("params.yaml"),
    metrics: Path = path_option("reports/metrics.json", "Output of the evaluate stage."),
    models_dir: ModelsDirOption = Path("models"),
    features_dir: FeaturesDirOption = Path("data/features"),
    out: Path = path_option("reports/registry.json", "Decision record JSON."),
) -> None:
    """Register the evaluation champion; promote it to alias `champion` only through the gate (params `register`)."""
    from uservalue.lifecycle.registry import run_register

    record = run_register(stage_context(params), metrics, models_dir, features_dir, out)
    candidate = record["candidate"]
    err.print(
        f"register: {record['model_name']} version {candidate['version']} ({candidate['model']}) -> "
        f"{record['decision']['alias']}; " + "; ".join(record["decision"]["reasons"]),
        markup=False,
    )


@reports_errors
def package(
    bentofile: Path = path_option("bentofile.yaml", "BentoML build file."),
    out: Path = path_option("reports/package.json", "Record of the built Bento (tag, model version, run)."),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Import the registered champion into the BentoML store and build the Bento (params `package`)."""
    from uservalue.lifecycle.package import run_package

    record = run_package(stage_context(params), bentofile, out)
    err.print(f"package: {record['bento']} serves {record['model_name']} version {record['model_version']} "
              f"({record['model_type']}), BentoML store {record['bentoml_home']}", markup=False)


@reports_errors
def score(
    events: Path = path_option("data/validated.parquet", "Canonical events (Parquet) to score."),
    out: Path = path_option("data/predictions/batch.parquet", "Per-user predictions (Parquet)."),
    as_of: Annotated[
        dt.datetime | None, typer.Option(help="Scoring time (ISO); default: the day after the last event.")
    ] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Batch-score every user with the registered champion: the service's features and model, offline."""
    from uservalue.io import atomic_path
    from uservalue.lifecycle.monitor import default_as_of
    from uservalue.lifecycle.registry import load_registered
    from uservalue.serving.requests import as_utc
    from uservalue.serving.scorer import score_events

    ctx = stage_context(params)
    if not events.is_file():
        raise InputError(events, "file does not exist", expected="canonical events (Parquet)")
    model, info = load_registered(ctx)
    when = as_utc(as_of) if as_of else default_as_of(events)
    scored = score_events(model, events, when)
    scored.insert(1, "model_version", info.version)
    with atomic_path(out) as tmp:
        scored.to_parquet(tmp, index=False)
    err.print(f"score: {len(scored):,} users at {when.isoformat()} with {info.name} version {info.version} -> {out}",
              markup=False)


@reports_errors
def monitor(
    params: ParamsOption = Path("params.yaml"),
    events: Path = path_option("data/validated.parquet", "Events scored as the current window (monitor.current=batch)."),
    features_dir: FeaturesDirOption = Path("data/features"),
    out_dir: Path = path_option("reports/monitoring", "Where <date>.html and latest.json go."),
    current: Annotated[str | None, typer.Option(help="Override monitor.current: batch | log.")] = None,
    log_dir: Annotated[
        Path | None, typer.Option(help="Prediction log (monitor.current=log); default: params serve.log_dir.")
    ] = None,
    fail_on_drift: Annotated[bool, typer.Option(help="Exit 3 when drift is detected (for schedulers).")] = False,
    split: Path = path_option("reports/split.json", "The featurize stage's split record (which log the reference "
                                                    "was built from; absent: the batch is scored at its cutoff)."),
) -> None:
    """Compare the champion's current predictions with its evaluation-time reference (Evidently)."""
    from uservalue.lifecycle.monitor import run_monitor

    ctx = stage_context(params, {"monitor.current": current})
    verdict = run_monitor(ctx, events, features_dir, log_dir or ctx.path(ctx.params.serve.log_dir), out_dir,
                          split_record=split)
    drifted = ", ".join(verdict["drifted_columns"]) or "none"
    err.print(f"monitor: drift_detected={str(verdict['drift_detected']).lower()} "
              f"(drifted share {verdict['drifted_share']:.2f}; drifted columns: {drifted}) -> {out_dir}/latest.json",
              markup=False)
    if fail_on_drift and verdict["drift_detected"]:
        raise typer.Exit(EXIT_DRIFT)
