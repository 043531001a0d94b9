"""The Spark session of the data stages run with engine `spark` (params `data.engine`, `validate.engine`),
and the few helpers they share: the session is the one params `spark` describe (as for featurize:
uservalue.features.spark, which the data layer may not import), Python workers run this interpreter
unless PYSPARK_PYTHON says otherwise, and Spark's part files become the one Parquet file later stages read.

PySpark is an optional dependency (`pip install '.[spark]'`): it is imported only when used.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from uservalue.config import SparkParams
from uservalue.errors import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# As uservalue.features.spark: no console progress bars; UTC and microsecond Parquet timestamps (parity).
DEFAULT_CONF = {"spark.ui.showConsoleProgress": "false"}
PARITY_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
}
PART_BATCH_ROWS = 122_880


def resolve_master(params: SparkParams) -> str:
    """spark.master: the SPARK_MASTER environment variable, else params `spark.master`."""
    return os.environ.get("SPARK_MASTER") or params.master


def data_spark_session(params: SparkParams, app_name: str, setting: str) -> SparkSession:
    """The session of params `spark` (an existing one in this process is reused). The data stages run
    Python on the workers (the canonical mapping of uservalue.data.sources, Great Expectations), so they
    default PYSPARK_PYTHON to this interpreter; on a cluster set it to an interpreter with uservalue."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError(f"{setting} is spark but PySpark is not installed: "
                          f"pip install '.[spark]' (or set {setting}: duckdb)") from None
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name).master(resolve_master(params))
    builder = builder.config("spark.driver.memory", params.driver_memory)
    for key, value in {**DEFAULT_CONF, **params.config, **PARITY_CONF}.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def python_workers(spark: SparkSession) -> None:
    """A session made elsewhere (tests, a notebook) may name a Python without pyarrow for its workers;
    when PYSPARK_PYTHON is unset, the stages' Python UDFs run this interpreter instead."""
    if "PYSPARK_PYTHON" not in os.environ:
        spark.sparkContext.pythonExec = sys.executable


@contextmanager
def spark_scratch(near: Path) -> Iterator[Path]:
    """A folder for Spark's part files beside `near` (same disk), removed afterwards."""
    near.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".spark-", dir=near))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def part_files(folder: Path) -> list[Path]:
    # Spark numbers part files in partition order: after a global ORDER BY, name order is row order.
    return sorted(folder.glob("part-*.parquet"))


def copy_parts(folder: Path, target: Path, schema: pa.Schema, row_group_rows: int = 1_000_000,
               store_schema: bool = True) -> int:
    """Spark's part files, in order, into one ZSTD Parquet file typed as `schema`, a batch at a time
    (bounded memory); returns the rows written. `store_schema` False: no Arrow schema in the file's
    metadata, as DuckDB writes it (the feature files)."""
    rows = 0
    with pq.ParquetWriter(target, schema, compression="zstd", store_schema=store_schema) as writer:
        for part in part_files(folder):
            for batch in pq.ParquetFile(part).iter_batches(batch_size=PART_BATCH_ROWS, columns=schema.names):
                writer.write_table(pa.Table.from_batches([batch]).cast(schema), row_group_size=row_group_rows)
                rows += batch.num_rows
    return rows


__all__ = ["copy_parts", "data_spark_session", "part_files", "python_workers", "resolve_master", "spark_scratch"]
