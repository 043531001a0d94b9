"""What every command shares: errors as one line and an exit code, progress bars, params with
command-line overrides, and the stage context."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from uservalue.errors import (
    EXIT_BAD_INPUT,
    EXIT_TRANSIENT,
    EXIT_VALIDATION_FAILED,
    TransientError,
    UservalueError,
    ValidationFailed,
)

err = Console(stderr=True)

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="params.yaml to read (one section per stage).")
]
FeaturesDirOption = Annotated[Path, typer.Option(help="Output of the featurize stage (train/eval features, meta.json).")]
ModelsDirOption = Annotated[Path, typer.Option(help="Directory holding one trained model per subdirectory.")]
F = TypeVar("F", bound=Callable[..., Any])


def path_option(default: str, help: str) -> Any:
    """A path option with its default and help on one line."""
    return typer.Option(Path(default), help=help)


def reports_errors(command: F, transient: Callable[[BaseException], bool] | None = None) -> F:
    """One clear line on stderr and an exit code: 1 validation failed, 2 bad input or configuration
    (final), 75 transient: file system I/O or what `transient` recognises (orchestrators retry);
    anything else is a bug and keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ValidationFailed as error:
            report("validation failed", error)
            raise typer.Exit(EXIT_VALIDATION_FAILED) from None
        except TransientError as error:
            report("transient failure (retry may help)", error)
            raise typer.Exit(EXIT_TRANSIENT) from None
        except UservalueError as error:  # bad input (InputError) or configuration (ConfigError)
            report("error", error)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Exception as error:
            if not (isinstance(error, OSError) or (transient is not None and transient(error))):
                raise
            report("transient failure (retry may help)", f"{type(error).__name__}: {error}")
            raise typer.Exit(EXIT_TRANSIENT) from None

    return wrapper  # type: ignore[return-value]


def report(kind: str, error: Exception | str) -> None:
    err.print(f"[bold red]{kind}[/]: ", end="")
    # Messages quote user data and "[...]" hints: never read them as markup.
    err.print(str(error), markup=False, highlight=False, soft_wrap=True)


def progress_bar() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} rows"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )


def counting(progress: Progress, description: str, tables: Iterable[Any], total: float | None = None) -> Iterator[Any]:
    task = progress.add_task(description, total=total)
    for table in tables:
        progress.advance(task, table.num_rows)
        yield table


def load(params: Path, overrides: dict[str, Any] | None = None) -> Any:
    """The validated params, with the options a command overrides (None: not given)."""
    from uservalue import duck
    from uservalue.config import apply_overrides, load_params, parse_params

    loaded = load_params(params)
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    if given:
        raw = apply_overrides(loaded.model_dump(mode="json", by_alias=True), given, str(params))
        loaded = parse_params(raw, f"{params} (with command-line overrides)")
    # Every DuckDB connection of this command honours params `duckdb` (memory limit, spill folder).
    duck.configure(**loaded.duckdb.model_dump())
    return loaded


def run_one(command: Callable[..., Any], args: list[str], prog_name: str) -> None:
    """Run one command as its own program (a DVC stage's entry script), loading only its module."""
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    app.command()(command)
    app(args, prog_name=prog_name)
