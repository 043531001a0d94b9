"""`uservalue report` (the report stage: reports/index.html) and `uservalue offline-assets` (the pages
third-party tools write, made to render without internet)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uservalue.cli import lifecycle
from uservalue.cli.common import ParamsOption, err, path_option, reports_errors


@lifecycle.reports_errors  # an unreachable MLflow store: exit 75 (retry), like the other lifecycle stages
def report(
    params: ParamsOption = Path("params.yaml"),
    reports_dir: Path = path_option("reports", "Where evaluate, register, package, validate and monitor wrote."),
    out: Path = path_option("reports/index.html", "The page (self-contained HTML)."),
) -> None:
    """One static page for the latest run: models vs targets, plots, registry decision, lineage, validation, drift."""
    from uservalue.lifecycle.report import run_report

    page = run_report(lifecycle.stage_context(params), reports_dir, out)
    err.print(f"report: {page}", markup=False)


@reports_errors
def offline_assets(
    dvc_template: Annotated[
        Path | None, typer.Option(help="Write the offline HTML template for `dvc plots show` here.")
    ] = None,
    site: Annotated[
        list[Path] | None, typer.Option(help="An HTML site (folder) to rewrite so it loads no remote asset.")
    ] = None,
) -> None:
    """Vega, Bootstrap, jQuery and Font Awesome from installed packages instead of CDNs (no download)."""
    from uservalue.io import write_text
    from uservalue.reporting.offline import dvc_plots_template, make_site_offline

    if dvc_template is not None:
        write_text(dvc_template, dvc_plots_template())
        err.print(f"offline-assets: dvc plots template -> {dvc_template}", markup=False)
    for folder in site or []:
        pages = make_site_offline(folder)
        err.print(f"offline-assets: {pages} pages of {folder} load only local assets", markup=False)
