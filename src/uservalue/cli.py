"""`uservalue`: one subcommand per pipeline stage, plus `generate` for synthetic data.

The DVC stages (pipelines/*.py) call these same commands, so `dvc repro` and a person at a
terminal run identical code. Errors are one clear message on stderr and a non-zero exit:
2 for bad input or configuration, 1 when the validation gate fails.
"""

from __future__ import annotations

import datetime as dt
import functools
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from uservalue.errors import ConfigError, InputError, UservalueError, ValidationFailed

app = typer.Typer(
    name="uservalue",
    help="Predict each user's future value from their behaviour log.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="params.yaml to read (one section per stage).")
]
F = TypeVar("F", bound=Callable[..., Any])


def _reports_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ValidationFailed as error:
            _report("validation failed", error)
            raise typer.Exit(1) from None
        except UservalueError as error:  # bad input (InputError) or configuration (ConfigError)
            _report("error", error)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _report(kind: str, error: Exception) -> None:
    err.print(f"[bold red]{kind}[/]: ", end="")
    # Messages quote user data and "[...]" hints: never read them as markup.
    err.print(str(error), markup=False, highlight=False, soft_wrap=True)


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} rows"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )


def _counting(progress: Progress, description: str, tables: Iterable[Any], total: float | None = None) -> Iterator[Any]:
    task = progress.add_task(description, total=total)
    for table in tables:
        progress.advance(task, table.num_rows)
        yield table


def _load(params: Path, overrides: dict[str, Any] | None = None):
    from uservalue.config import load_params, parse_params
    from uservalue.orchestration.stage_runner import apply_overrides

    loaded = load_params(params)
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    if not given:
        return loaded
    raw = apply_overrides(loaded.model_dump(mode="json", by_alias=True), given, str(params))
    return parse_params(raw, f"{params} (with command-line overrides)")


@app.command()
@_reports_errors
def ingest(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Canonical events Parquet to write (sorted by user, time).")] = Path(
        "data/events.parquet"
    ),
    truth_dir: Annotated[
        Path, typer.Option(help="Where the synthetic source writes its planted truth (a stub for real data).")
    ] = Path("data/truth"),
    source: Annotated[
        str | None, typer.Option(help="Override data.source: cdnow | taobao | synthetic | file.")
    ] = None,
    path: Annotated[str | None, typer.Option(help="Override data.path (file read by taobao / file).")] = None,
) -> None:
    """Read the configured source (params `data`) into one canonical events table."""
    from uservalue.data.sources import ingest as run_ingest

    cfg = _load(params, {"data.source": source, "data.path": path})
    with _progress() as progress:
        task = progress.add_task(f"ingest {cfg.data.source}", total=None)
        result = run_ingest(cfg.data, out, truth_dir)
        progress.update(task, completed=result.events, total=result.events)
    err.print(f"ingest: {result.events:,} events from {result.source} -> {out}")


@app.command()
@_reports_errors
def validate(
    params: ParamsOption = Path("params.yaml"),
    events: Annotated[Path, typer.Option(help="Canonical events to check.")] = Path("data/events.parquet"),
    out: Annotated[Path, typer.Option(help="Events that passed, written only if the gate passes.")] = Path(
        "data/validated.parquet"
    ),
    quarantine: Annotated[Path, typer.Option(help="Rows moved aside in quarantine mode, with the reason.")] = Path(
        "data/quarantine.parquet"
    ),
    report_dir: Annotated[
        Path, typer.Option(help="Validation result (JSON), summary and Data Docs (HTML).")
    ] = Path("reports/validation"),
    mode: Annotated[str | None, typer.Option(help="Override validate.mode: fail | quarantine.")] = None,
) -> None:
    """Run the Great Expectations suite (params `validate`); exit 1 if the gate fails."""
    from uservalue.data.validation import validate_file

    cfg = _load(params, {"validate.mode": mode})
    if not events.is_file():
        raise InputError(events, "file does not exist", expected="the output of `uservalue ingest`")
    with _progress() as progress:
        task = progress.add_task("validate", total=None)
        outcome = validate_file(
            events, cfg.validate_, cfg.data.behaviors,
            out=out, quarantine_out=quarantine, report_dir=report_dir,
        )
        progress.update(task, completed=outcome.rows, total=outcome.rows)
    err.print(
        f"validate: {len(outcome.clean):,} rows passed, {len(outcome.quarantined):,} quarantined "
        f"({outcome.quarantine_share:.2%}); report in {report_dir}"
    )


@app.command()
@_reports_errors
def featurize(
    params: ParamsOption = Path("params.yaml"),
    events: Annotated[Path, typer.Option(help="Validated canonical events.")] = Path("data/validated.parquet"),
    out_dir: Annotated[Path, typer.Option(help="Directory for train.parquet, eval.parquet, meta.json.")] = Path(
        "data/features"
    ),
) -> None:
    """Build features and labels at the cutoffs of params `split` (definition: params `featurize`)."""
    from uservalue.features.sql import write_feature_sets

    cfg = _load(params)
    if not events.is_file():
        raise InputError(events, "file does not exist", expected="the output of `uservalue validate`")
    with _progress() as progress:
        task = progress.add_task("featurize", total=None)
        rows = write_feature_sets(events, cfg.split, cfg.featurize, cfg.data.behaviors, out_dir)
        progress.update(task, completed=sum(rows.values()), total=sum(rows.values()))
    err.print("featurize: " + ", ".join(f"{k}={v:,} users" for k, v in rows.items()) + f" -> {out_dir}")


@app.command()
@_reports_errors
def generate(
    out: Annotated[Path, typer.Option(help="Parquet file for the generated events.")] = Path(
        "data/synthetic/events.parquet"
    ),
    truth_dir: Annotated[Path, typer.Option(help="Directory for the planted truth.")] = Path(
        "data/synthetic/truth"
    ),
    params: ParamsOption = Path("params.yaml"),
    users: Annotated[int | None, typer.Option(min=1, help="Number of users.")] = None,
    events_per_user: Annotated[
        float | None, typer.Option(min=0.001, help="Mean non-purchase events per user.")
    ] = None,
    days: Annotated[int | None, typer.Option(min=2, help="Length of the log in days.")] = None,
    start: Annotated[
        dt.datetime | None, typer.Option(formats=["%Y-%m-%d"], help="First day of the log (YYYY-MM-DD).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed: same seed and options, same bytes.")] = None,
    drift: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Shift of behaviour mix and spend, 0..1.")
    ] = None,
    taobao_csv: Annotated[
        Path | None,
        typer.Option(help="Also write the log in the Taobao UserBehavior CSV format (to test that source)."),
    ] = None,
) -> None:
    """Generate a Taobao-like log with planted truth (defaults from params `data.synthetic`)."""
    from uservalue.config import SyntheticSource, describe_validation_error
    from uservalue.schema import DEFAULT_BEHAVIORS
    from uservalue.data.sources.synthetic import generate as run_generate

    # params.yaml supplies the defaults when present; the generator also works without one.
    base = _load(params).data if params.is_file() else None
    options = {"users": users, "events_per_user": events_per_user, "days": days, "seed": seed, "drift": drift,
               "start": start.date() if start else None}
    try:
        synthetic = SyntheticSource.model_validate(
            {**(base.synthetic.model_dump() if base else {}), **{k: v for k, v in options.items() if v is not None}}
        )
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, "generate options")) from None
    behaviors = base.behaviors if base else DEFAULT_BEHAVIORS
    expected = synthetic.users * synthetic.events_per_user * 1.03
    with _progress() as progress:
        result = run_generate(
            synthetic, out, truth_dir, behaviors=behaviors,
            progress=lambda tables: _counting(progress, "generate", tables, total=expected),
        )
    err.print(f"generate: {result.events:,} events for {result.users:,} users -> {out} (truth: {truth_dir})")
    if taobao_csv is not None:
        from uservalue.data.sources.taobao import export_taobao_csv

        rows = export_taobao_csv(out, taobao_csv)
        err.print(f"generate: {rows:,} rows in the Taobao format -> {taobao_csv}")


if __name__ == "__main__":  # pragma: no cover
    app()


@app.command()
@_reports_errors
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to train (one of params train.models' names).")],
    params: ParamsOption = Path("params.yaml"),
    features_dir: Annotated[Path, typer.Option(help="Output of the featurize stage.")] = Path("data/features"),
    out_dir: Annotated[Path, typer.Option(help="Directory for the model, run.json and influence.json.")] = Path(
        "models/<model>"
    ),
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (overrides train.device).")] = None,
) -> None:
    """Fit one model on the training cutoffs and track the run in MLflow (params `train`, `tracking`)."""
    from uservalue.config import MODEL_NAMES
    from uservalue.lifecycle.train import train_model

    if model not in MODEL_NAMES:
        raise ConfigError(f"--model: unknown model '{model}'; known: {list(MODEL_NAMES)}")
    cfg = _load(params, {"train.device": device})
    target = Path(str(out_dir).replace("<model>", model))
    with _progress() as progress:
        task = progress.add_task(f"train {model}", total=None)

        def epoch_done(metrics: dict[str, float], step: int) -> None:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            progress.update(task, description=f"train {model} epoch {step}: {shown}")

        result = train_model(model, cfg, features_dir, target, Path.cwd(), log_metrics_hook=epoch_done)
    influence = ", ".join(f"{k}={v:.3f}" for k, v in (result.influence or {}).items())
    err.print(f"train {model}: {result.seconds:.1f} s, run {result.run_id}" + (f", influence {influence}" if influence else ""),
              markup=False)


@app.command()
@_reports_errors
def evaluate(
    params: ParamsOption = Path("params.yaml"),
    features_dir: Annotated[Path, typer.Option(help="Output of the featurize stage.")] = Path("data/features"),
    models_dir: Annotated[Path, typer.Option(help="Directory holding one trained model per subdirectory.")] = Path(
        "models"
    ),
    metrics_out: Annotated[Path, typer.Option(help="Metrics JSON of every model.")] = Path("reports/metrics.json"),
    plots_dir: Annotated[Path, typer.Option(help="Plot data (gains, decile calibration).")] = Path("reports/plots"),
    table_out: Annotated[Path, typer.Option(help="Markdown comparison table.")] = Path("reports/model_comparison.md"),
    predictions_out: Annotated[Path, typer.Option(help="Per-user predictions of every model.")] = Path(
        "data/predictions/eval.parquet"
    ),
) -> None:
    """Score every trained model on the evaluation cutoff; pick the champion (params `evaluate`)."""
    from uservalue.lifecycle.evaluate import run_evaluate

    cfg = _load(params)
    report = run_evaluate(cfg, features_dir, models_dir, metrics_out, plots_dir, table_out, predictions_out, Path.cwd())
    primary = report["primary_metric"]
    for name, row in report["models"].items():
        err.print(f"evaluate {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()), markup=False)
    err.print(f"evaluate: champion by {primary}: {report['champion']}", markup=False)


@app.command()
@_reports_errors
def register(
    params: ParamsOption = Path("params.yaml"),
    metrics: Annotated[Path, typer.Option(help="Output of the evaluate stage.")] = Path("reports/metrics.json"),
    models_dir: Annotated[Path, typer.Option(help="Directory holding the trained models.")] = Path("models"),
    features_dir: Annotated[Path, typer.Option(help="Output of the featurize stage.")] = Path("data/features"),
    out: Annotated[Path, typer.Option(help="Decision record JSON.")] = Path("reports/registry.json"),
) -> None:
    """Register the evaluation champion; promote it to alias `champion` only through the gate (params `register`)."""
    from uservalue.lifecycle.registry import run_register

    cfg = _load(params)
    record = run_register(cfg, metrics, models_dir, features_dir, out, Path.cwd())
    candidate = record["candidate"]
    err.print(
        f"register: {record['model_name']} version {candidate['version']} ({candidate['model']}) -> "
        f"{record['decision']['alias']}; " + "; ".join(record["decision"]["reasons"]),
        markup=False,
    )


@app.command()
@_reports_errors
def package(
    params: ParamsOption = Path("params.yaml"),
    bentofile: Annotated[Path, typer.Option(help="BentoML build file.")] = Path("bentofile.yaml"),
    out: Annotated[Path, typer.Option(help="Record of the built Bento (tag, model version, run).")] = Path(
        "reports/package.json"
    ),
) -> None:
    """Import the registered champion into the BentoML store and build the Bento (params `package`)."""
    from uservalue.lifecycle.package import run_package

    cfg = _load(params)
    record = run_package(cfg, Path.cwd(), bentofile, out)
    err.print(f"package: {record['bento']} serves {record['model_name']} version {record['model_version']} "
              f"({record['model_type']}), BentoML store {record['bentoml_home']}", markup=False)


@app.command()
@_reports_errors
def score(
    events: Annotated[Path, typer.Option(help="Canonical events (Parquet) to score.")] = Path("data/validated.parquet"),
    out: Annotated[Path, typer.Option(help="Per-user predictions (Parquet).")] = Path("data/predictions/batch.parquet"),
    as_of: Annotated[
        dt.datetime | None, typer.Option(help="Scoring time (ISO); default: the day after the last event.")
    ] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Batch-score every user with the registered champion: the service's features and model, offline."""
    from uservalue.io import atomic_path
    from uservalue.lifecycle.monitor import default_as_of
    from uservalue.lifecycle.registry import load_registered
    from uservalue.serving.scorer import as_utc, score_events

    cfg = _load(params)
    if not events.is_file():
        raise InputError(events, "file does not exist", expected="canonical events (Parquet)")
    model, info = load_registered(cfg, Path.cwd())
    when = as_utc(as_of) if as_of else default_as_of(events)
    scored = score_events(model, events, when)
    scored.insert(1, "model_version", info.version)
    with atomic_path(out) as tmp:
        scored.to_parquet(tmp, index=False)
    err.print(f"score: {len(scored):,} users at {when.isoformat()} with {info.name} version {info.version} -> {out}",
              markup=False)


@app.command()
@_reports_errors
def monitor(
    params: ParamsOption = Path("params.yaml"),
    events: Annotated[Path, typer.Option(help="Events scored as the current window (monitor.current=batch).")] = Path(
        "data/validated.parquet"
    ),
    features_dir: Annotated[Path, typer.Option(help="Output of featurize (the reference's features).")] = Path(
        "data/features"
    ),
    out_dir: Annotated[Path, typer.Option(help="Where <date>.html and latest.json go.")] = Path("reports/monitoring"),
    current: Annotated[str | None, typer.Option(help="Override monitor.current: batch | log.")] = None,
    log_dir: Annotated[
        Path | None, typer.Option(help="Prediction log (monitor.current=log); default: params serve.log_dir.")
    ] = None,
    fail_on_drift: Annotated[bool, typer.Option(help="Exit 3 when drift is detected (for schedulers).")] = False,
) -> None:
    """Compare the champion's current predictions with its evaluation-time reference (Evidently)."""
    from uservalue.lifecycle.monitor import run_monitor

    cfg = _load(params, {"monitor.current": current})
    verdict = run_monitor(cfg, Path.cwd(), events, features_dir, log_dir or Path(cfg.serve.log_dir), out_dir)
    drifted = ", ".join(verdict["drifted_columns"]) or "none"
    err.print(f"monitor: drift_detected={str(verdict['drift_detected']).lower()} "
              f"(drifted share {verdict['drifted_share']:.2f}; drifted columns: {drifted}) -> {out_dir}/latest.json",
              markup=False)
    if fail_on_drift and verdict["drift_detected"]:
        raise typer.Exit(3)


@app.command()
@_reports_errors
def serve(
    port: Annotated[int, typer.Option(envvar="USERVALUE_PORT", help="Port (env USERVALUE_PORT).")] = 3000,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it local.")] = "127.0.0.1",
    record: Annotated[Path, typer.Option(help="The package stage's record of the built Bento.")] = Path(
        "reports/package.json"
    ),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Serve the Bento the package stage built (`bentoml serve <tag>`), with this project's settings."""
    import os
    import shutil

    from uservalue.lifecycle.package import bentoml_env, read_package_record

    cfg = _load(params)
    built = read_package_record(record)
    env = bentoml_env(cfg, Path.cwd())
    env["BENTOML_HOME"] = str((Path.cwd() / built["bentoml_home"]).resolve())
    env.setdefault("USERVALUE_PROJECT_DIR", str(Path.cwd()))
    env.setdefault("USERVALUE_PARAMS", str(params.resolve()))
    bentoml = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or "bentoml"
    err.print(f"serve: {built['bento']} ({built['model_name']} version {built['model_version']}) "
              f"on http://{host}:{port}", markup=False)
    os.execvpe(bentoml, [bentoml, "serve", built["bento"], "--host", host, "--port", str(port)], env)


ProjectDirOption = Annotated[Path, typer.Option(help="The project (dvc.yaml, params.yaml) to work in.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Temporary params override <section.key>=<YAML value> (repeatable).")
]


@app.command()
@_reports_errors
def stage(
    name: Annotated[str, typer.Argument(help="A dvc.yaml stage (validate, train@mlp) or `train` (every model).")],
    project_dir: ProjectDirOption = Path("."),
    set_: SetOption = None,
    force: Annotated[bool, typer.Option(help="Re-run even if DVC finds the stage up to date.")] = False,
) -> None:
    """Run one DVC stage with temporary overrides; params.yaml is left as it was (what Airflow tasks run)."""
    from uservalue.orchestration.stage_runner import parse_assignments, run_stage

    run = run_stage(project_dir, name, parse_assignments(set_ or []), force=force)
    status = "done" if run.exit_code == 0 else f"failed (exit {run.exit_code})"
    err.print(f"stage {name}: {', '.join(run.targets)} {status} in {run.seconds:.1f} s", markup=False)
    if run.exit_code:
        raise typer.Exit(run.exit_code)


@app.command()
@_reports_errors
def plan(
    project_dir: ProjectDirOption = Path("."),
    set_: SetOption = None,
) -> None:
    """Check overrides against params.yaml and print what a retrain would run (one JSON line)."""
    import json

    from uservalue.orchestration.stage_runner import parse_assignments
    from uservalue.orchestration.stage_runner import plan as make_plan

    print(json.dumps(make_plan(project_dir, parse_assignments(set_ or []))))


@app.command()
@_reports_errors
def airflow(
    port: Annotated[int, typer.Option(envvar="AIRFLOW_PORT", help="API/UI port (env AIRFLOW_PORT).")] = 8080,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it local.")] = "127.0.0.1",
    project_dir: ProjectDirOption = Path("."),
) -> None:
    """Airflow standalone for this project: its DAGs, AIRFLOW_HOME in .airflow/, the UI on 127.0.0.1."""
    import os

    from uservalue.orchestration.airflow_local import ADMIN_USER, ensure_admin_password, prepare, standalone_env

    env = standalone_env(project_dir, port, host)
    password_path = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    password, created = ensure_admin_password(password_path)
    prepare(env)
    err.print(f"airflow: UI and API on {env['AIRFLOW__API__BASE_URL']} (AIRFLOW_HOME {env['AIRFLOW_HOME']}); "
              f"user {ADMIN_USER}, password in {password_path}", markup=False)
    if created:  # shown once; afterwards it is only in the git-ignored file
        err.print(f"airflow: generated admin password: {password}", markup=False)
    os.execvpe("airflow", ["airflow", "standalone"], env)
