"""Read a delimited or Parquet file into canonical event batches (Arrow, streaming); when the CSV
parser gives up, a line scanner names the bad row.

Transaction logs (order exports such as UCI Online Retail) are read too: every line may be one
behaviour (`default_behavior`), the amount may be quantity x unit price, lines without a user may be
dropped (to a rejects file, never silently), and negative or cancelled lines become `return` events
carrying the positive amount and quantity given back."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from uservalue.errors import InputError
from uservalue.io import atomic_path
from uservalue.schema import EVENTS_SCHEMA, EVENTS_TEXT_SCHEMA, ITEM_TEXT, PURCHASE, RETURN

_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_INTEGER = r"^\s*[-+]?\d+\s*$"
_FLOAT_ID = r"^([-+]?\d+)\.0+$"  # a spreadsheet's integer id written as a float: 12345.0
MISSING_USER = "missing user id"  # the reason a dropped guest line carries in the rejects file
_BLOCK_BYTES = 32 << 20  # CSV bytes parsed at once (~1M Taobao rows): ingest's memory per batch
PARQUET_BATCH_ROWS = 1_000_000


@dataclass(frozen=True)
class TabularSpec:
    """How one source's columns and names map onto the canonical table."""

    columns: Mapping[str, str | None]  # canonical column -> source column
    behaviors: Mapping[str, str]  # source behaviour name -> canonical behaviour
    ts_format: str  # iso | unix_s | unix_ms | a strftime pattern
    params_hint: str  # where in params.yaml the user fixes a mapping problem
    header: bool = True
    delimiter: str = ","
    headerless_names: tuple[str, ...] = ()  # column names when the file has no header
    purchase_amount: float = 1.0
    category_amounts: Mapping[str, float] = field(default_factory=dict)
    default_behavior: str | None = None  # canonical behaviour of every line when no column names it
    missing_user: str = "error"  # error | drop (dropped lines go to the rejects, with the reason)
    returns: bool = False  # negative purchase lines become returns ('return' is a behaviour of the log)
    returns_column: str | None = None  # lines whose value here starts with returns_prefix are returns
    returns_prefix: str | None = None
    id_normalize: bool = False  # "12345.0" -> "12345" in the id columns
    returns_hint: str = ""  # how to read negative lines as returns instead (shown in the error)

    def source(self, canonical: str) -> str | None:
        return self.columns.get(canonical) or None

    def read_columns(self) -> list[str]:
        """The file's columns this spec reads, each once, in mapping order."""
        names = [v for v in self.columns.values() if v]
        if self.returns_column:
            names.append(self.returns_column)
        return list(dict.fromkeys(names))


def _first_true(mask: pa.ChunkedArray | pa.Array) -> int | None:
    mask = pc.fill_null(mask, False)
    if not pc.any(mask).as_py():
        return None
    return int(pc.index(mask, True).as_py())


class RawBatch:
    """One batch of raw columns plus what is needed to name a row in an error."""

    def __init__(self, table: pa.Table, path: Path, first_row: int, spec: TabularSpec,
                 rows: np.ndarray | None = None) -> None:
        self.table = table
        self.path = path
        self.first_row = first_row  # row number (as reported) of the batch's first row
        self.spec = spec
        self.rows = rows  # row numbers (as reported) of each row, once rows were dropped; None: consecutive

    def row_number(self, index: int) -> int:
        return self.first_row + index if self.rows is None else int(self.rows[index])

    def row_numbers(self) -> np.ndarray:
        if self.rows is None:
            return np.arange(self.first_row, self.first_row + self.table.num_rows, dtype=np.int64)
        return self.rows

    def fail(self, index: int, column: str, problem: str, expected: str) -> InputError:
        value = self.table.column(column)[index].as_py()
        return InputError(
            self.path, problem, row=self.row_number(index), column=column, expected=expected, found=value
        )

    def missing_users(self) -> pa.ChunkedArray:
        """True where the line has no user id (null or blank)."""
        column = self.strings("user_id")
        trimmed = pc.utf8_trim_whitespace(column)
        return pc.fill_null(pc.or_kleene(pc.is_null(trimmed), pc.equal(trimmed, "")), True)

    def split_missing_users(self) -> tuple[RawBatch, pa.Table | None]:
        """(this batch without the lines that have no user id, those lines as rejects) when
        `missing_user: drop`; else (this batch, None) and such a line fails in canonical()."""
        if self.spec.missing_user != "drop":
            return self, None
        missing = self.missing_users()
        if not pc.any(missing).as_py():
            return self, None
        numbers = self.row_numbers()
        mask = missing.to_numpy(zero_copy_only=False).astype(bool)
        rejected = self.table.filter(missing)
        rejects = _reject_rows(rejected, numbers[mask], MISSING_USER)
        kept = RawBatch(self.table.filter(pc.invert(missing)), self.path, self.first_row, self.spec,
                        rows=numbers[~mask])
        return kept, rejects

    def raw(self, canonical: str) -> pa.ChunkedArray | None:
        name = self.spec.source(canonical)
        return None if name is None else self.table.column(name)

    def strings(self, canonical: str) -> pa.ChunkedArray | None:
        column = self.raw(canonical)
        if column is None:
            return None
        if pa.types.is_floating(column.type):  # a float id column (a spreadsheet's): NaN is no value
            column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
        return column if pa.types.is_string(column.type) else pc.cast(column, pa.string())

    def required(self, canonical: str) -> pa.ChunkedArray:
        column = self.strings(canonical)
        assert column is not None  # FileSource validation guarantees required columns are mapped
        trimmed = pc.utf8_trim_whitespace(column)
        bad = _first_true(pc.or_kleene(pc.is_null(trimmed), pc.equal(trimmed, "")))
        if bad is not None:
            raise self.fail(bad, self.spec.source(canonical), "empty value", f"a non-empty {canonical}")
        return trimmed

    def number(self, canonical: str, default: float, *, signed: bool = False) -> pa.ChunkedArray:
        """The column as float64 (nulls: `default`); finite, and >= 0 unless `signed`."""
        name = self.spec.source(canonical)
        column = self.raw(canonical)
        if column is None:
            return pa.chunked_array([np.full(self.table.num_rows, default)], pa.float64())
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            column = self.strings(canonical)
            bad = _first_true(pc.invert(pc.match_substring_regex(column, _NUMBER)))
            if bad is not None:
                raise self.fail(bad, name, "not a number", f"a number for {canonical}")
            column = pc.utf8_trim_whitespace(column)
        values = pc.cast(column, pa.float64())
        bad = _first_true(pc.invert(pc.is_finite(values)) if signed
                          else pc.or_kleene(pc.less(values, 0), pc.invert(pc.is_finite(values))))
        if bad is not None:
            if signed:
                raise self.fail(bad, name, f"non-finite {canonical}", f"a finite {canonical}")
            raise self.fail(bad, name, f"negative or non-finite {canonical}",
                            f"{canonical} >= 0{self.spec.returns_hint}")
        return pc.fill_null(values, default)

    def timestamps(self) -> pa.ChunkedArray:
        name = self.spec.source("ts")
        column = self.raw("ts")
        fmt = self.spec.ts_format
        if pa.types.is_timestamp(column.type):
            unit_type = pa.timestamp("us", tz=column.type.tz or "UTC")
            values = pc.cast(column, unit_type)
        elif fmt in ("unix_s", "unix_ms"):
            if not pa.types.is_integer(column.type):
                column = self.strings("ts")
                bad = _first_true(pc.invert(pc.match_substring_regex(column, _INTEGER)))
                if bad is not None:
                    raise self.fail(bad, name, "unparseable timestamp", f"an integer unix time ({fmt})")
                column = pc.utf8_trim_whitespace(column)
            seconds = pc.cast(column, pa.int64())
            micros = pc.multiply_checked(seconds, 1_000_000 if fmt == "unix_s" else 1_000)
            values = pc.cast(micros, pa.timestamp("us", tz="UTC"))
        else:
            strings = self.strings("ts").to_pandas()
            kwargs = {"format": "ISO8601"} if fmt == "iso" else {"format": fmt}
            parsed = pd.to_datetime(strings, errors="coerce", utc=True, **kwargs)
            bad_mask = parsed.isna().to_numpy()
            if bad_mask.any():
                expected = "an ISO 8601 timestamp" if fmt == "iso" else f"a timestamp like '{fmt}'"
                raise self.fail(int(np.argmax(bad_mask)), name, "unparseable timestamp", expected)
            values = pa.chunked_array([pa.array(parsed.astype("datetime64[us, UTC]"))])
        bad = _first_true(pc.is_null(values))
        if bad is not None:
            raise self.fail(bad, name, "empty value", "a timestamp")
        return values

    def behaviors(self) -> pa.ChunkedArray:
        name = self.spec.source("behavior")
        if name is None:  # one behaviour for every line (a purchase-only order export)
            assert self.spec.default_behavior is not None  # FileSource validation guarantees one of them
            return pa.chunked_array([pa.array(np.full(self.table.num_rows, self.spec.default_behavior, dtype=object),
                                              pa.string())])
        column = self.required("behavior")
        known = list(self.spec.behaviors)
        index = pc.index_in(column, value_set=pa.array(known, pa.string()))
        bad = _first_true(pc.is_null(index))
        if bad is not None:
            raise self.fail(
                bad, name, "unknown behaviour",
                f"one of {known} (map more names in {self.spec.params_hint})",
            )
        canonical = pa.array([self.spec.behaviors[k] for k in known], pa.string())
        return pc.take(canonical, index)

    def optional_ids(self, canonical: str) -> pa.ChunkedArray:
        column = self.strings(canonical)
        if column is None:
            return pa.chunked_array([pa.nulls(self.table.num_rows, pa.string())])
        return self.normalized(column)

    def normalized(self, ids: pa.ChunkedArray) -> pa.ChunkedArray:
        """"12345.0" -> "12345" when `id_normalize` (spreadsheets write integer ids as floats)."""
        if not self.spec.id_normalize:
            return ids
        return pc.replace_substring_regex(ids, _FLOAT_ID, r"\1")

    def _flagged_returns(self) -> pa.ChunkedArray | None:
        """True where the returns column starts with the returns prefix (a cancelled invoice)."""
        if not (self.spec.returns_column and self.spec.returns_prefix):
            return None
        column = self.table.column(self.spec.returns_column)
        if not pa.types.is_string(column.type):
            column = pc.cast(column, pa.string())
        return pc.fill_null(pc.starts_with(pc.utf8_trim_whitespace(column), self.spec.returns_prefix), False)

    def _returns(self, behavior: pa.ChunkedArray, quantity: pa.ChunkedArray,
                 amount: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray, pa.ChunkedArray]:
        """Purchase lines with a negative quantity or amount, or flagged by the returns column, become
        returns; every return carries the positive quantity and amount given back. A negative value on
        any other line is an error naming it."""
        negative = pc.or_(pc.less(quantity, 0), pc.less(amount, 0))
        money = pc.is_in(behavior, value_set=pa.array([PURCHASE, RETURN], pa.string()))
        flagged = self._flagged_returns()
        is_return = pc.and_(money, negative if flagged is None else pc.or_(negative, flagged))
        is_return = pc.or_(is_return, pc.equal(behavior, RETURN))
        for canonical, values in (("quantity", quantity), ("amount", amount)):
            bad = _first_true(pc.and_(pc.less(values, 0), pc.invert(is_return)))
            if bad is not None:
                name = self.spec.source(canonical) or self.spec.source("unit_price")
                raise self.fail(bad, name, f"negative {canonical} on a '{behavior[bad].as_py()}' line",
                                f"{canonical} >= 0 (only purchases can be returned)")
        behavior = pc.if_else(is_return, RETURN, behavior)
        return behavior, pc.if_else(is_return, pc.abs(quantity), quantity), pc.if_else(is_return, pc.abs(amount), amount)

    def item_text(self) -> pa.ChunkedArray | None:
        """The mapped item text (issue 23), trimmed, blank as null; None when no column is mapped.
        Bytes that are not UTF-8 (a Parquet file's binary column, or an unchecked string one) are an error
        naming the row; length and characters are the gate's (uservalue.data.validation, limits)."""
        name = self.spec.source(ITEM_TEXT)
        if name is None:
            return None
        column = self.table.column(name)
        try:
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                column.validate(full=True)  # Parquet readers do not check UTF-8
            column = pc.cast(column, pa.string())  # from binary: checks UTF-8
        except pa.ArrowInvalid:
            raise self._undecodable_text(column, name) from None
        trimmed = pc.utf8_trim_whitespace(column)
        return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)

    def _undecodable_text(self, column: pa.ChunkedArray, name: str) -> InputError:
        """The first row whose bytes are not UTF-8 (error path only: a scan in Python)."""
        offset = 0
        for chunk in column.chunks:
            large = pa.types.is_large_string(chunk.type) or pa.types.is_large_binary(chunk.type)
            data = pa.Array.from_buffers(pa.large_binary() if large else pa.binary(), len(chunk), chunk.buffers(),
                                         offset=chunk.offset)
            for index, value in enumerate(data.to_pylist()):
                try:
                    (value or b"").decode("utf-8")
                except UnicodeDecodeError as error:
                    return InputError(self.path, f"item text is not valid UTF-8 (byte 0x{value[error.start]:02x} "
                                      f"at byte {error.start + 1})", row=self.row_number(offset + index),
                                      column=name, expected="UTF-8 text", found=value[:60])
            offset += len(chunk)
        return InputError(self.path, "item text is not valid UTF-8", column=name, expected="UTF-8 text")

    def canonical(self) -> pa.Table:
        behavior = self.behaviors()
        signed = self.spec.returns
        quantity = self.number("quantity", 1.0, signed=signed)
        is_money = pc.is_in(behavior, value_set=pa.array([PURCHASE, RETURN], pa.string()))
        category = self.optional_ids("category_id")
        if self.spec.source("amount") is not None:
            amount = self.number("amount", 0.0, signed=signed)
        elif self.spec.source("unit_price") is not None:
            # An order line: quantity x unit price (money only on purchases and returns).
            price = self.number("unit_price", 0.0, signed=signed)
            amount = pc.if_else(is_money, pc.multiply(quantity, price), 0.0)
        else:
            # No money in the source: a purchase is worth its category's value or the constant.
            per_category = pc.cast(
                _lookup(category, self.spec.category_amounts), pa.float64()
            )
            purchase_value = pc.fill_null(per_category, self.spec.purchase_amount)
            amount = pc.if_else(is_money, purchase_value, 0.0)
        if signed:
            behavior, quantity, amount = self._returns(behavior, quantity, amount)
        columns = {
            "user_id": self.normalized(self.required("user_id")),
            "ts": self.timestamps(),
            "behavior": behavior,
            "item_id": self.optional_ids("item_id"),
            "category_id": category,
            "quantity": quantity,
            "amount": amount,
        }
        text = self.item_text()
        if text is not None:
            columns[ITEM_TEXT] = text
            return pa.Table.from_pydict(columns, schema=EVENTS_TEXT_SCHEMA)
        return pa.Table.from_pydict(columns, schema=EVENTS_SCHEMA)


def _reject_rows(table: pa.Table, rows: np.ndarray, reason: str) -> pa.Table:
    """Lines set aside, as the rejects file holds them: row, reason, then the file's columns as text."""
    columns = {"row": pa.array(rows, pa.int64()), "reason": pa.array([reason] * table.num_rows, pa.string())}
    for name in table.column_names:
        column = table.column(name)
        columns[name] = column if pa.types.is_string(column.type) else pc.cast(column, pa.string())
    return pa.table(columns)


class RejectSink:
    """The lines ingest sets aside (a guest line when `missing_user: drop`), streamed with their row and
    reason to a CSV file (a hidden temporary beside `path`, renamed into place by close(), removed by
    discard()); counted per reason for the ingest summary. Memory holds one batch, not the rejects."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.counts: dict[str, int] = {}
        self._writer: pacsv.CSVWriter | None = None
        self._tmp: Path | None = None
        self._schema: pa.Schema | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, table: pa.Table) -> None:
        if self.path is None:
            raise ValueError("lines were set aside but the RejectSink has no file to write them to")
        reasons = table.column("reason")
        for reason in reasons.unique().to_pylist():
            self.counts[reason] = self.counts.get(reason, 0) + int(pc.sum(pc.equal(reasons, reason)).as_py())
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            os.close(handle)
            self._tmp, self._schema = Path(name), table.schema
            self._writer = pacsv.CSVWriter(self._tmp, table.schema)
        self._writer.write_table(table.cast(self._schema))

    def close(self) -> Path | None:
        """Put the rejects in place (a header `row,reason` alone when there are none)."""
        if self.path is None:
            return None
        if self._writer is None:
            empty = pa.table({"row": pa.array([], pa.int64()), "reason": pa.array([], pa.string())})
            with atomic_path(self.path) as tmp:
                pacsv.write_csv(empty, tmp)
            return self.path
        self._writer.close()
        os.replace(self._tmp, self.path)
        self._writer = self._tmp = None
        return self.path

    def discard(self) -> None:
        """Remove what was written (ingest failed: the previous rejects file stays as it was)."""
        if self._writer is not None:
            self._writer.close()
            self._tmp.unlink(missing_ok=True)
            self._writer = self._tmp = None


def _lookup(keys: pa.ChunkedArray, table: Mapping[str, float]) -> pa.ChunkedArray:
    if not table:
        return pa.chunked_array([pa.nulls(len(keys), pa.float64())])
    names = list(table)
    index = pc.index_in(keys, value_set=pa.array(names, pa.string()))
    return pc.take(pa.array([table[n] for n in names], pa.float64()), index)


# ---------------------------------------------------------------- CSV


def _guess_delimiter(line: str, expected: str) -> str | None:
    for candidate in (",", ";", "\t", "|", " "):
        if candidate != expected and candidate in line:
            return candidate
    return None


def _undecodable_field(raw: bytes, spec: TabularSpec, names: list[str]) -> str | None:
    """The column whose bytes are not UTF-8 (latin-1 maps bytes 1:1, so the split is exact)."""
    fields = next(csv.reader(io.StringIO(raw.decode("latin-1").rstrip("\r\n")), delimiter=spec.delimiter))
    for index, value in enumerate(fields):
        try:
            value.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            return names[index] if index < len(names) else None
    return None


def _locate_csv_problem(path: Path, spec: TabularSpec, names: list[str]) -> InputError | None:
    """Scan line by line for the first undecodable or mis-shaped row (slow; error path only)."""
    n_fields = len(names)
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return InputError(
                    path, f"bytes are not valid UTF-8 (byte 0x{raw[error.start]:02x} at "
                    f"character {error.start + 1})", row=number,
                    column=_undecodable_field(raw, spec, names), expected="UTF-8 text",
                )
            text = line.rstrip("\r\n")
            if not text:
                continue
            fields = next(csv.reader(io.StringIO(text), delimiter=spec.delimiter))
            if len(fields) != n_fields:
                hint = _guess_delimiter(text, spec.delimiter)
                problem = f"{len(fields)} field(s) separated by {spec.delimiter!r}"
                column = None
                if hint and len(fields) == 1:
                    problem += f" (is the delimiter {hint!r}?)"
                elif len(fields) < n_fields:
                    column = names[len(fields)]  # the first column left without a value
                    problem += f", so no value for '{column}'"
                return InputError(
                    path, problem, row=number, column=column,
                    expected=f"{n_fields} fields ({spec.delimiter.join(names)})", found=text[:120],
                )
    return None


def _read_header(path: Path, spec: TabularSpec) -> list[str]:
    with path.open("rb") as handle:
        first = handle.readline()
    try:
        text = first.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise InputError(path, "header bytes are not valid UTF-8", row=1,
                         expected="UTF-8 text", found=first[error.start:error.start + 4]) from None
    return next(csv.reader(io.StringIO(text), delimiter=spec.delimiter))


def _check_mapped_columns(path: Path, spec: TabularSpec, available: list[str], row: int | None) -> None:
    mapped = list(spec.columns.items())
    if spec.returns_column:
        mapped.append(("returns", spec.returns_column))
    for canonical, name in mapped:
        if name and name not in available:
            shown = ",".join(available)[:200]
            hint = ""
            if len(available) == 1:
                guess = _guess_delimiter(available[0], spec.delimiter)
                if guess:
                    hint = f" (the file seems separated by {guess!r}, not {spec.delimiter!r})"
            raise InputError(
                path, f"missing column '{name}' for {canonical}{hint}", row=row,
                column=name, expected=f"columns named in {spec.params_hint}", found=shown,
            )


def _csv_batches(path: Path, spec: TabularSpec, block_bytes: int = _BLOCK_BYTES) -> Iterator[RawBatch]:
    if spec.header:
        names = _read_header(path, spec)
        _check_mapped_columns(path, spec, names, row=1)
    else:
        names = list(spec.headerless_names)
        _check_mapped_columns(path, spec, names, row=None)
    wanted = spec.read_columns()

    def unreadable(error: pa.ArrowInvalid) -> InputError:
        located = _locate_csv_problem(path, spec, names)
        return located or InputError(path, f"cannot be parsed as CSV: {error}")

    try:  # open_csv already parses the first block, so its errors need a row too
        reader = _open_csv(path, spec, names, wanted, block_bytes)
    except pa.ArrowInvalid as error:
        raise unreadable(error) from None
    next_row = 2 if spec.header else 1
    while True:
        try:
            record_batch = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as error:
            raise unreadable(error) from None
        table = pa.Table.from_batches([record_batch])
        yield RawBatch(table, path, next_row, spec)
        next_row += table.num_rows


def _open_csv(path: Path, spec: TabularSpec, names: list[str], wanted: list[str],
              block_bytes: int = _BLOCK_BYTES) -> pacsv.CSVStreamingReader:
    return pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(
            column_names=None if spec.header else names, block_size=block_bytes
        ),
        parse_options=pacsv.ParseOptions(delimiter=spec.delimiter),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in wanted},
            include_columns=wanted,
            strings_can_be_null=True,
            null_values=[""],
        ),
    )


def _parquet_batches(path: Path, spec: TabularSpec, batch_rows: int = PARQUET_BATCH_ROWS) -> Iterator[RawBatch]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(path, f"not a readable Parquet file ({error})") from None
    # Parquet has no header row: "row 1" would point at the first event, so name no row.
    _check_mapped_columns(path, spec, parquet.schema_arrow.names, row=None)
    wanted = spec.read_columns()
    next_row = 1
    for record_batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted):
        table = pa.Table.from_batches([record_batch])
        yield RawBatch(table, path, next_row, spec)
        next_row += table.num_rows


def check_readable(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist", expected="an existing file (data.path)")
    if not path.is_file():
        raise InputError(path, "is not a file", expected="a CSV or Parquet file")
    with path.open("rb") as handle:
        head = handle.read(65536)  # enough to tell "empty or only blanks"; never the whole log
    if not head.strip():
        raise InputError(path, "file is empty", expected="event rows")
    return path


def is_parquet(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"PAR1"


def read_canonical(path: str | Path, spec: TabularSpec, fmt: str = "auto", *, block_bytes: int = _BLOCK_BYTES,
                   batch_rows: int = PARQUET_BATCH_ROWS, rejects: RejectSink | None = None) -> Iterator[pa.Table]:
    """Yield canonical event tables, one per input batch (CSV: `block_bytes` of text; Parquet: `batch_rows`
    rows), so memory is bounded by the batch, not the file; raise InputError at the first bad row, which
    is named by its row in the file (rows are counted across batches). Lines the spec drops (no user id,
    `missing_user: drop`) go to `rejects` (required then: nothing is dropped unseen)."""
    path = check_readable(path)
    parquet = is_parquet(path) if fmt == "auto" else fmt == "parquet"
    batches = _parquet_batches(path, spec, batch_rows) if parquet else _csv_batches(path, spec, block_bytes)
    for batch in batches:
        if not batch.table.num_rows:
            continue
        kept, rejected = batch.split_missing_users()
        if rejected is not None:
            if rejects is None:
                raise ValueError("missing_user: drop needs a RejectSink to receive the dropped lines")
            rejects.add(rejected)
        if kept.table.num_rows:
            yield kept.canonical()


def read_amount_table(path: str | Path) -> dict[str, float]:
    """A per-category purchase value table: CSV with columns category_id,amount."""
    path = check_readable(path)
    frame = pd.read_csv(path, dtype=str)  # as text, so an error shows the cell as written
    for column in ("category_id", "amount"):
        if column not in frame.columns:
            raise InputError(path, f"missing column '{column}'", row=1, column=column,
                             expected="columns category_id,amount", found=",".join(frame.columns))
    amounts = pd.to_numeric(frame["amount"], errors="coerce")
    bad = amounts.isna() | (amounts < 0)
    if bad.any():
        index = int(np.argmax(bad.to_numpy()))
        raise InputError(path, "bad purchase value", row=index + 2, column="amount",
                         expected="a number >= 0", found=frame["amount"].iloc[index])
    return dict(zip(frame["category_id"].astype(str), amounts.astype(float), strict=True))


__all__ = ["MISSING_USER", "RawBatch", "RejectSink", "TabularSpec", "check_readable", "read_amount_table",
           "read_canonical"]
