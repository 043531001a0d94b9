"""Commands of the data stages: ingest, validate, featurize, and `generate` for synthetic logs."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from uservalue.cli.common import (
    ParamsOption,
    counting,
    err,
    load,
    path_option,
    progress_bar,
    reports_errors,
)
from uservalue.errors import ConfigError, InputError


@reports_errors
def ingest(
    params: ParamsOption = Path("params.yaml"),
    out: Path = path_option("data/events.parquet", "Canonical events Parquet to write (sorted by user, time)."),
    truth_dir: Path = path_option("data/truth", "Where the synthetic source writes its planted truth (a stub for real data)."),
    source: Annotated[
        str | None, typer.Option(help="Override data.source: cdnow | taobao | synthetic | file.")
    ] = None,
    path: Annotated[str | None, typer.Option(help="Override data.path (file read by taobao / file).")] = None,
    rejects: Annotated[Path | None, typer.Option(
        help="CSV of the lines set aside (guests under data.file.missing_user: drop), with row and reason "
             "[default: rejects.csv beside --out].")] = None,
    summary: Annotated[Path | None, typer.Option(help="Write the ingest summary (events, lines set aside) as JSON here.")] = None,
    engine: Annotated[str | None, typer.Option(help="Override data.engine: duckdb | spark.")] = None,
) -> None:
    """Read the configured source (params `data`) into one canonical events table (engine: `data.engine`,
    duckdb or spark on the session of params `spark`)."""
    from uservalue.data.manifest import external_target, finish_output
    from uservalue.io import write_json

    cfg = load(params, {"data.source": source, "data.path": path, "data.engine": engine})
    target = external_target(out, cfg.data.external_root)  # --out *.manifest.json: the Parquet under data.external_root
    with progress_bar() as progress:
        task = progress.add_task(f"ingest {cfg.data.source} ({cfg.data.engine})", total=None)
        if cfg.data.engine == "spark":
            from uservalue.data.spark_ingest import ingest_spark

            result = ingest_spark(cfg.data, target, truth_dir, rejects, cfg.spark)
        else:
            from uservalue.data.sources import ingest as run_ingest

            result = run_ingest(cfg.data, target, truth_dir, rejects)
        progress.update(task, completed=result.events, total=result.events)
    finish_output(out, target)
    if summary is not None:
        write_json(summary, result.summary())
    dropped = sum(result.rejected.values())
    dropped_text = (f"; {dropped:,} line(s) dropped ({', '.join(f'{n:,} {r}' for r, n in result.rejected.items())})"
                    f" -> {result.rejects}") if dropped else ""
    err.print(f"ingest: {result.events:,} events from {result.source} -> {out}{dropped_text}")


@reports_errors
def validate(
    params: ParamsOption = Path("params.yaml"),
    events: Path = path_option("data/events.parquet", "Canonical events to check."),
    out: Path = path_option("data/validated.parquet", "Events that passed, written only if the gate passes."),
    quarantine: Path = path_option("data/quarantine.parquet", "Rows moved aside in quarantine mode, with the reason."),
    report_dir: Path = path_option("reports/validation", "Validation result (JSON), summary and Data Docs (HTML)."),
    mode: Annotated[str | None, typer.Option(help="Override validate.mode: fail | quarantine | auto.")] = None,
    engine: Annotated[str | None, typer.Option(help="Override validate.engine: duckdb | spark.")] = None,
) -> None:
    """Run the Great Expectations suite (params `validate`; engine: `validate.engine`, duckdb or spark on the
    session of params `spark`); exit 1 if the gate fails."""
    from uservalue.data.manifest import external_target, finish_output, resolve_input
    from uservalue.data.window import resolve_window_for

    cfg = load(params, {"validate.mode": mode, "validate.engine": engine})
    events = resolve_input(events)  # a manifest (*.manifest.json): the verified external Parquet it lists
    targets = {name: external_target(name, cfg.data.external_root) for name in (out, quarantine)}
    if not events.is_file():
        raise InputError(events, "file does not exist", expected="the output of `uservalue ingest`")
    # validate.ts_min/ts_max and mode `auto`: the source's window (a file's: its own range plus a margin), mode.
    checks = resolve_window_for(cfg.validate_, cfg.data, events)
    if checks is not cfg.validate_:
        lower, upper = checks.window
        err.print(f"validate: for {cfg.data.source}: window [{lower.isoformat() if lower else '-'}, "
                  f"{upper.isoformat() if upper else '-'}), mode {checks.mode}", markup=False, soft_wrap=True)
    with progress_bar() as progress:
        task = progress.add_task(f"validate ({checks.engine})", total=None)
        if checks.engine == "spark":
            from uservalue.data.spark_validation import validate_file_spark

            outcome = validate_file_spark(events, checks, cfg.data.behaviors, out=targets[out],
                                          quarantine_out=targets[quarantine], report_dir=report_dir,
                                          spark_params=cfg.spark)
        else:
            from uservalue.data.validation import validate_file

            outcome = validate_file(
                events, checks, cfg.data.behaviors,
                out=targets[out], quarantine_out=targets[quarantine], report_dir=report_dir,
            )
        progress.update(task, completed=outcome.rows, total=outcome.rows)
    for name, target in targets.items():
        finish_output(name, target)
    err.print(
        f"validate: {len(outcome.clean):,} rows passed, {len(outcome.quarantined):,} quarantined "
        f"({outcome.quarantine_share:.2%}); report in {report_dir}"
    )


@reports_errors
def featurize(
    params: ParamsOption = Path("params.yaml"),
    events: Path = path_option("data/validated.parquet", "Validated canonical events."),
    out_dir: Path = path_option("data/features", "Directory for train.parquet, eval.parquet, meta.json."),
    engine: Annotated[str | None, typer.Option(help="Override featurize.engine: duckdb | spark.")] = None,
    split_out: Annotated[
        Path | None, typer.Option(help="Write the resolved cutoffs here (JSON; the DVC stage: reports/split.json).")
    ] = None,
) -> None:
    """Build features and labels at the cutoffs of params `split` (`auto` values resolved from the events'
    time range; definition: params `featurize`; engine: `featurize.engine`, duckdb or spark on the session
    of params `spark`)."""
    from uservalue.data.manifest import resolve_input
    from uservalue.data.window import resolve_split_for, split_record
    from uservalue.io import write_json

    cfg = load(params, {"featurize.engine": engine})
    engine = cfg.featurize.engine
    events = resolve_input(events)  # a manifest (*.manifest.json): the verified external Parquet it lists
    if not events.is_file():
        raise InputError(events, "file does not exist", expected="the output of `uservalue validate`")
    split, observed = resolve_split_for(cfg.split, cfg.data, cfg.validate_, events)
    record = split_record(cfg.split, split, cfg.data.source, observed)
    err.print(f"featurize: eval cutoff {record['eval_cutoff']}, horizon {record['horizon_days']} days, train cutoffs "
              f"{', '.join(record['train_cutoffs']) or 'none'} (from {record['origin']['eval_cutoff']})", markup=False,
              soft_wrap=True)
    with progress_bar() as progress:
        task = progress.add_task(f"featurize ({engine})", total=None)
        if engine == "spark":
            from uservalue.features.spark import write_feature_sets_spark

            rows = write_feature_sets_spark(events, split, cfg.featurize, cfg.data.behaviors, out_dir,
                                            cfg.spark)
        else:
            from uservalue.features.store import write_feature_sets

            rows = write_feature_sets(events, split, cfg.featurize, cfg.data.behaviors, out_dir)
        progress.update(task, completed=sum(rows.values()), total=sum(rows.values()))
    if split_out is not None:
        write_json(split_out, record)
    err.print(f"featurize ({engine}): " + ", ".join(f"{k}={v:,} users" for k, v in rows.items()) + f" -> {out_dir}")


@reports_errors
def generate(
    out: Path = path_option("data/synthetic/events.parquet", "Parquet file for the generated events."),
    truth_dir: Path = path_option("data/synthetic/truth", "Directory for the planted truth."),
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
    from uservalue.data.sources.synthetic import generate as run_generate
    from uservalue.schema import DEFAULT_BEHAVIORS

    # params.yaml supplies the defaults when present; the generator also works without one.
    base = load(params).data if params.is_file() else None
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
    with progress_bar() as progress:
        result = run_generate(
            synthetic, out, truth_dir, behaviors=behaviors,
            progress=lambda tables: counting(progress, "generate", tables, total=expected),
        )
    err.print(f"generate: {result.events:,} events for {result.users:,} users -> {out} (truth: {truth_dir})")
    if taobao_csv is not None:
        from uservalue.data.sources.taobao import export_taobao_csv

        rows = export_taobao_csv(out, taobao_csv)
        err.print(f"generate: {rows:,} rows in the Taobao format -> {taobao_csv}")
