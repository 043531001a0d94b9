"""Commands of the online store: `materialize` (every user's events into serve.store)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uservalue.cli.common import ParamsOption, err, load, path_option, progress_bar, reports_errors

StoreUrlOption = Annotated[str | None, typer.Option(
    help="The store: sqlite:///<path> | redis://host:port/db (else USERVALUE_STORE_URL, else params serve.store.url).")]


@reports_errors
def materialize(
    params: ParamsOption = Path("params.yaml"),
    events: Path = path_option("data/validated.parquet", "Validated canonical events (every user's history)."),
    report: Path = path_option("reports/materialize.json", "Users, events, seconds, store and its size (JSON)."),
    store_url: StoreUrlOption = None,
) -> None:
    """Write every user's events into the online store (params `materialize`, `serve.store`,
    `data.event_log`), switched in atomically; an unreachable store exits 75."""
    from uservalue.lifecycle.materialize import run_materialize

    cfg = load(params)
    with progress_bar() as progress:
        task = progress.add_task("materialize", total=None)
        result = run_materialize(Path.cwd(), cfg, events, report, store_url,
                                 progress=lambda users, rows: progress.update(task, completed=rows))
    err.print(f"materialize: {result.users:,} users, {result.events:,} events in {result.seconds:.1f} s "
              f"-> {result.store.url} (generation {result.store.generation}, {result.store.bytes:,} bytes); "
              f"report {report}", markup=False)
