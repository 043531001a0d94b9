"""Errors a user can act on (each names the file, row, column and what was expected), and the exit
codes the CLI maps them to; orchestrators retry only EXIT_TRANSIENT."""

from __future__ import annotations

from pathlib import Path

EXIT_VALIDATION_FAILED = 1  # the data broke the expectation suite: final
EXIT_BAD_INPUT = 2  # bad input or configuration: final, a retry cannot help
EXIT_DRIFT = 3  # `monitor --fail-on-drift` found drift
EXIT_TRANSIENT = 75  # EX_TEMPFAIL: a store, lock or build subprocess failed; retrying may help


class UservalueError(Exception):
    """Base class for errors reported to users as one clear line (and a non-zero exit)."""


class ConfigError(UservalueError):
    """params.yaml (or a CLI option) holds a value that cannot be used."""


class InputError(UservalueError):
    """An input file is missing or malformed.

    `row` counts like a spreadsheet: for CSV it is the physical line number (a header
    is line 1), for Parquet the 1-based data row.
    """

    def __init__(
        self,
        path: str | Path,
        problem: str,
        *,
        row: int | None = None,
        column: str | None = None,
        expected: str | None = None,
        found: object | None = None,
    ) -> None:
        self.path = str(path)
        self.problem = problem
        self.row = row
        self.column = column
        self.expected = expected
        self.found = found
        where = [self.path]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        message = ", ".join(where) + f": {problem}"
        if expected is not None:
            message += f"; expected {expected}"
        if found is not None:
            message += f", found {found!r}"
        super().__init__(message)


class ValidationFailed(UservalueError):
    """The events table broke the expectation suite (details are in the report)."""


class TransientError(UservalueError):
    """A failure outside the input: the tracking or model store, a lock, a build subprocess."""
