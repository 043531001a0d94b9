"""The bucket hash of item and category ids, written down so every engine computes the same buckets.

    id_hash(id) = the first 15 hex digits of md5(UTF-8 bytes of id), read as an integer
    bucket(id)  = 0 when id is null, else id_hash(id) % buckets + 1   (so 1..buckets; 0 = none/padding)

Why this one: md5 is built into DuckDB, Spark SQL and Python's hashlib with the same hex output, so
no engine needs a user-defined function; 15 hex digits are 60 bits, a non-negative BIGINT in every
engine (Spark has no unsigned integers), so `%` means the same everywhere and never sees a negative
number. It replaces DuckDB's built-in `hash()`, whose value is an implementation detail of one engine
(and of one DuckDB version). Buckets only need to spread ids evenly; md5's speed is ample for it.

Three implementations, proven equal by tests/data/test_spark_parity.py:
  Python  hash_values / bucket_values  (numpy object arrays of str or None)
  DuckDB  duckdb_hash_sql / duckdb_bucket_sql  (SQL expressions over a VARCHAR column)
  Spark   spark_hash_sql / spark_bucket_sql  (Spark SQL expressions; use with F.expr for Columns)
"""

from __future__ import annotations

import hashlib

import numpy as np

HEX_DIGITS = 15  # 60 bits: fits a signed 64-bit integer with room to spare


def id_hash(value: str) -> int:
    """id_hash of one non-null id."""
    return int(hashlib.md5(value.encode("utf-8")).hexdigest()[:HEX_DIGITS], 16)


def hash_values(values: np.ndarray) -> np.ndarray:
    """id_hash of each value as uint64 (0 for None), hashing each distinct value once."""
    hashed = {v: id_hash(v) for v in dict.fromkeys(values.tolist()) if v is not None}
    return np.fromiter((0 if v is None else hashed[v] for v in values.tolist()),
                       dtype=np.uint64, count=len(values))


def bucket_values(values: np.ndarray, buckets: int) -> np.ndarray:
    """bucket(id) of each value as int32: 0 for None, else 1..buckets."""
    hashes = hash_values(values)
    null = np.fromiter((v is None for v in values.tolist()), dtype=bool, count=len(values))
    return np.where(null, 0, hashes % np.uint64(buckets) + np.uint64(1)).astype(np.int32)


def duckdb_hash_sql(column: str) -> str:
    """DuckDB: id_hash(column) as BIGINT (NULL for NULL). DuckDB casts '0x…' strings as hex."""
    return f"CAST('0x' || substr(md5({column}), 1, {HEX_DIGITS}) AS BIGINT)"


def spark_hash_sql(column: str) -> str:
    """Spark SQL: id_hash(column) as BIGINT (NULL for NULL); conv() reads base 16 exactly."""
    return f"CAST(conv(substr(md5({column}), 1, {HEX_DIGITS}), 16, 10) AS BIGINT)"


def _bucket_sql(column: str, hash_sql: str, buckets: int) -> str:
    return f"(CASE WHEN {column} IS NULL THEN 0 ELSE {hash_sql} % {int(buckets)} + 1 END)"


def duckdb_bucket_sql(column: str, buckets: int) -> str:
    """DuckDB: bucket(column) (a BIGINT expression; cast it to the type you store)."""
    return _bucket_sql(column, duckdb_hash_sql(column), buckets)


def spark_bucket_sql(column: str, buckets: int) -> str:
    """Spark SQL: bucket(column) (a BIGINT expression; `F.expr(...)` makes it a Column)."""
    return _bucket_sql(column, spark_hash_sql(column), buckets)
