"""Operating the project: serve the Bento, run a DVC stage with overrides, plan a retrain, Airflow."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from uservalue.cli.common import ParamsOption, err, path_option, reports_errors

ProjectDirOption = Annotated[Path, typer.Option(help="The project (dvc.yaml, params.yaml) to work in.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Temporary params override <section.key>=<YAML value> (repeatable).")
]


@reports_errors
def serve(
    port: Annotated[int, typer.Option(envvar="USERVALUE_PORT", help="Port (env USERVALUE_PORT).")] = 3000,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it local.")] = "127.0.0.1",
    record: Path = path_option("reports/package.json", "The package stage's record of the built Bento."),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Serve the Bento the package stage built (`bentoml serve <tag>`), with this project's settings."""
    import os
    import shutil

    from uservalue.cli.lifecycle import stage_context
    from uservalue.lifecycle.package import bentoml_env, read_package_record

    ctx = stage_context(params)
    built = read_package_record(record)
    env = bentoml_env(ctx)
    env["BENTOML_HOME"] = str(ctx.path(built["bentoml_home"]).resolve())
    env.setdefault("USERVALUE_PROJECT_DIR", str(ctx.root))
    env.setdefault("USERVALUE_PARAMS", str(params.resolve()))
    bentoml = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or "bentoml"
    err.print(f"serve: {built['bento']} ({built['model_name']} version {built['model_version']}) "
              f"on http://{host}:{port}", markup=False)
    os.execvpe(bentoml, [bentoml, "serve", built["bento"], "--host", host, "--port", str(port)], env)


@reports_errors
def stage(
    name: Annotated[str, typer.Argument(help="A dvc.yaml stage (validate, train@mlp) or `train` (every model).")],
    project_dir: ProjectDirOption = Path("."),
    set_: SetOption = None,
    force: Annotated[bool, typer.Option(help="Re-run even if DVC finds the stage up to date.")] = False,
) -> None:
    """Run one DVC stage with temporary overrides; params.yaml is left as it was (what Airflow tasks run)."""
    from uservalue.config import parse_assignments
    from uservalue.orchestration.stage_runner import run_stage

    run = run_stage(project_dir, name, parse_assignments(set_ or []), force=force)
    status = "done" if run.exit_code == 0 else f"failed (exit {run.exit_code})"
    err.print(f"stage {name}: {', '.join(run.targets)} {status} in {run.seconds:.1f} s", markup=False)
    if run.exit_code:
        raise typer.Exit(run.exit_code)


@reports_errors
def plan(
    project_dir: ProjectDirOption = Path("."),
    set_: SetOption = None,
) -> None:
    """Check overrides against params.yaml and print what a retrain would run (one JSON line): the models,
    their train stages and the cutoffs (`split: auto` resolved from data/validated.parquet, as featurize will)."""
    import json

    from uservalue.config import parse_assignments
    from uservalue.orchestration.stage_runner import plan as make_plan

    print(json.dumps(make_plan(project_dir, parse_assignments(set_ or []))))


@reports_errors
def airflow(
    port: Annotated[int, typer.Option(envvar="AIRFLOW_PORT", help="API/UI port (env AIRFLOW_PORT).")] = 8080,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it local.")] = "127.0.0.1",
    project_dir: ProjectDirOption = Path("."),
) -> None:
    """Airflow standalone for this project: its DAGs, AIRFLOW_HOME in .airflow/, the UI on 127.0.0.1."""
    import os

    from uservalue.orchestration.airflow_local import (
        ADMIN_USER,
        ensure_admin_password,
        prepare,
        standalone_env,
    )

    env = standalone_env(project_dir, port, host)
    password_path = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    password, created = ensure_admin_password(password_path)
    prepare(env)
    err.print(f"airflow: UI and API on {env['AIRFLOW__API__BASE_URL']} (AIRFLOW_HOME {env['AIRFLOW_HOME']}); "
              f"user {ADMIN_USER}, password in {password_path}", markup=False)
    if created:  # shown once; afterwards it is only in the git-ignored file
        err.print(f"airflow: generated admin password: {password}", markup=False)
    os.execvpe("airflow", ["airflow", "standalone"], env)
