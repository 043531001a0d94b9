"""One way to open DuckDB, so every stage gets the same limits, the same spill folder and a quiet console.

The process-wide settings: an environment variable wins (USERVALUE_DUCKDB_MEMORY_LIMIT,
USERVALUE_DUCKDB_THREADS, USERVALUE_DUCKDB_TEMP_DIRECTORY: for a run, a subprocess or a benchmark), else
params `duckdb` (the CLI calls `configure()` once it has read params.yaml), else the defaults below. A caller's
own `memory_limit` (featurize, materialize, the scorer) is capped by the process-wide one, so no
connection can be configured past the stage's budget; beyond its limit DuckDB spills to the folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

DEFAULT_MEMORY_LIMIT = "4GB"
DEFAULT_TEMP_DIRECTORY = "tmp/duckdb"
_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


@dataclass(frozen=True)
class DuckSettings:
    memory_limit: str = DEFAULT_MEMORY_LIMIT
    threads: int = 0  # 0: DuckDB's default, all cores
    temp_directory: str = DEFAULT_TEMP_DIRECTORY


_configured: DuckSettings | None = None


def configure(memory_limit: str, threads: int = 0, temp_directory: str = DEFAULT_TEMP_DIRECTORY) -> None:
    """Set the process-wide settings (params `duckdb`); later connections use them."""
    global _configured
    size_bytes(memory_limit)  # fail here, naming the value, rather than at the first query
    _configured = DuckSettings(memory_limit, threads, temp_directory)


def settings() -> DuckSettings:
    base = _configured or DuckSettings()
    env = os.environ
    return DuckSettings(
        memory_limit=env.get("USERVALUE_DUCKDB_MEMORY_LIMIT") or base.memory_limit,
        threads=int(env.get("USERVALUE_DUCKDB_THREADS") or base.threads),
        temp_directory=env.get("USERVALUE_DUCKDB_TEMP_DIRECTORY") or base.temp_directory,
    )


def size_bytes(size: str) -> int:
    """'4GB' -> 4e9, '512MiB' -> 512 * 2**20 (DuckDB's own reading of its limits)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"memory limit {size!r}: expected a size like 4GB or 512MiB")
    number, unit, binary = match.groups()
    unit = unit.upper()
    scale = 1024 ** "KMGT".index(unit) * 1024 if binary and unit else _UNITS[unit]
    return int(float(number) * scale)


def effective_memory_limit(requested: str | None) -> str:
    """The smaller of a caller's limit and the process-wide one."""
    cap = settings().memory_limit
    if requested is None:
        return cap
    return requested if size_bytes(requested) <= size_bytes(cap) else cap


def connect(*, memory_limit: str | None = None, threads: int = 0) -> duckdb.DuckDBPyConnection:
    current = settings()
    spill = Path(current.temp_directory).resolve()
    spill.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "memory_limit": effective_memory_limit(memory_limit),
        "preserve_insertion_order": True,
        # An in-memory database spills only when told where; without it a big sort fails with OOM.
        "temp_directory": str(spill),
    }
    if threads or current.threads:
        config["threads"] = threads or current.threads
    con = duckdb.connect(config=config)
    # Progress bars belong to our CLI; DuckDB's own would interleave with them.
    con.execute("SET enable_progress_bar = false")
    return con


def sql_string(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"
