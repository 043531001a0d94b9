"""`uservalue init`: point the project at a data file; for your own file, inspect it and propose the
column mapping, the time format and the window, written into params.yaml with its comments kept."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uservalue.cli.common import ParamsOption, err, reports_errors
from uservalue.errors import ConfigError

SOURCES = ("file", "taobao", "cdnow", "synthetic")


def _column_overrides(assignments: list[str]) -> dict[str, str | None]:
    """["user_id=Customer ID", "category_id="] -> {"user_id": "Customer ID", "category_id": None}."""
    out: dict[str, str | None] = {}
    for assignment in assignments:
        name, sep, column = assignment.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--column {assignment!r}: expected <canonical>=<your column> (empty: none), "
                              "e.g. --column user_id='Customer ID'")
        out[name.strip()] = column.strip() or None
    return out


def _supported_file_keys(model: type) -> tuple[str, ...]:
    """The data.file keys this version's params know, and `unit_price` when columns accept one."""
    from pydantic import ValidationError

    keys = tuple(model.model_fields)  # type: ignore[attr-defined]
    try:
        model.model_validate({"columns": {"user_id": "u", "ts": "t", "behavior": "b", "unit_price": "p"}})  # type: ignore[attr-defined]
    except ValidationError:
        return keys
    return (*keys, "unit_price")


@reports_errors
def init(
    source: Annotated[str, typer.Option(help="Data source: file (your CSV or Parquet) | taobao | cdnow | synthetic.")
                      ] = "file",
    path: Annotated[Path | None, typer.Option(help="The data file (put it under data/raw/, a dependency of ingest).")
                    ] = None,
    params: ParamsOption = Path("params.yaml"),
    column: Annotated[
        list[str] | None,
        typer.Option("--column", "-c", help="Force a mapping <canonical>=<your column> (empty: none); repeatable.")
    ] = None,
    sample_rows: Annotated[int, typer.Option(min=10, help="Rows read to guess columns and formats.")] = 1000,
    dry_run: Annotated[bool, typer.Option(help="Print the proposed params; leave params.yaml as it is.")] = False,
) -> None:
    """Set params `data` (and `validate`'s window) for a data file: for `--source file`, inspect its header
    and a sample of rows and propose the column mapping (customer id, invoice date, quantity, unit price or
    amount...), the time format and the window; cutoffs stay `auto` (reports/split.json, `uservalue plan`)."""
    import yaml

    from uservalue.config import FileSource
    from uservalue.data.inspection import inspect_file, write_settings

    if source not in SOURCES:
        raise ConfigError(f"--source: unknown source {source!r}; known: {list(SOURCES)}")
    if source in ("file", "taobao") and path is None:
        raise ConfigError(f"--source {source} reads a file: give --path, e.g. --path data/raw/orders.csv")
    notes: list[str] = []
    if source == "file":
        assert path is not None
        behaviors = ("view", "fav", "cart", "buy")
        if params.is_file():
            current = (yaml.safe_load(params.read_text()) or {}).get("data", {}).get("behaviors")
            behaviors = tuple(current) if current else behaviors
        # data.path is relative to the project, the folder of params.yaml (where DVC runs the stages).
        on_disk = path if path.is_absolute() else params.parent / path
        proposal = inspect_file(on_disk, display_path=str(path), overrides=_column_overrides(column or []),
                                sample_rows=sample_rows, supported=_supported_file_keys(FileSource),
                                behaviors=behaviors)
        settings, notes = proposal.settings, proposal.notes
        notes.insert(0, f"{path}: {len(proposal.columns)} columns {proposal.columns}, {proposal.sample_rows} rows sampled")
    else:
        settings = {"data.source": source, "data.path": str(path) if path else None,
                    "validate.ts_min": "auto", "validate.ts_max": "auto"}
        notes.append(f"{source}: the documented window and split (validate.ts_min/ts_max and split `auto`)")
    for note in notes:
        err.print(f"init: {note}", markup=False, soft_wrap=True)
    shown = yaml.safe_dump(settings, sort_keys=False, allow_unicode=True, default_flow_style=None, width=4096)
    if dry_run:
        print(shown, end="")
        err.print(f"init: dry run, {params} unchanged", markup=False, soft_wrap=True)
        return
    write_settings(params, settings)
    err.print(f"init: wrote {', '.join(settings)} into {params} (comments kept); next: `dvc repro` or "
              "`uservalue plan` to see the cutoffs", markup=False, soft_wrap=True)
