"""`uservalue influence`: every trained model's behaviour influence (effect and share, models/<model>/
influence.json) side by side, with the planted truth next to them on synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uservalue.cli.common import ParamsOption, err, path_option, reports_errors


@reports_errors
def influence(
    params: ParamsOption = Path("params.yaml"),
    models_dir: Path = path_option("models", "Where the train stage wrote models/<model>/influence.json."),
    out: Annotated[Path | None, typer.Option(help="Also write the tables (Markdown) here.")] = None,
) -> None:
    """Both influence tables for every trained model: effect (one more event) and share (of the value)."""
    from uservalue.config import load_params
    from uservalue.io import write_text
    from uservalue.lifecycle.influence_report import influence_section

    text = influence_section(load_params(params), models_dir)
    typer.echo(text)
    if out is not None:
        write_text(out, text)
        err.print(f"influence: {out}", markup=False)
