"""Errors a user can act on: each names the file, the row, the column and what was expected."""

from __future__ import annotations

from pathlib import Path


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
