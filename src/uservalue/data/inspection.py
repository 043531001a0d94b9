"""`uservalue init`: look at a user's transaction file and propose its params.

`inspect_file` reads the header and a sample of rows (CSV or Parquet), then proposes which column is which
canonical column (customer id, invoice date, quantity, unit price or amount, item, behaviour), how time
is written (`data.file.ts_format`), the validation window (the whole time column's range plus a margin,
read in bounded batches), purchase-only defaults, returns and guest lines. `write_settings` writes the
proposal into params.yaml keeping its comments and layout (ruamel.yaml round trip), atomically.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from uservalue.errors import ConfigError, InputError

SAMPLE_ROWS = 1000
# Normalised column names (lower case, letters and digits only) that name each canonical column, best first.
NAME_CANDIDATES: dict[str, tuple[str, ...]] = {
    "user_id": ("userid", "customerid", "customer", "user", "clientid", "client", "memberid", "buyerid",
                "accountid", "custid", "customerno", "customernumber", "shopperid", "visitorid"),
    "ts": ("ts", "timestamp", "invoicedate", "orderdate", "eventtime", "datetime", "purchasedate",
           "transactiondate", "createdat", "date", "time", "unixts", "eventdate"),
    "behavior": ("behavior", "behaviour", "behaviortype", "behaviourtype", "eventtype", "event", "action",
                 "actiontype"),
    "item_id": ("itemid", "stockcode", "sku", "productid", "productcode", "item", "product", "articleid",
                "article"),
    "category_id": ("categoryid", "category", "productcategory", "categorycode", "department"),
    "quantity": ("quantity", "qty", "units", "quantityordered"),
    "amount": ("amount", "lineamount", "linetotal", "total", "totalprice", "revenue", "sales", "spend",
               "value", "netamount"),
    "unit_price": ("unitprice", "price", "priceeach", "itemprice", "unitcost"),
}
# Invoice-like columns: a letter prefix on some values marks cancellations (UCI Online Retail: 'C536379').
INVOICE_NAMES = ("invoice", "invoiceno", "invoicenumber", "invoiceid", "orderid", "ordernumber", "orderno",
                 "transactionid")
BEHAVIOR_WORDS: dict[str, tuple[str, ...]] = {
    "view": ("view", "pv", "pageview", "visit", "click", "impression"),
    "fav": ("fav", "favorite", "favourite", "like", "wishlist", "save"),
    "cart": ("cart", "addtocart", "basket", "addtobasket"),
    "buy": ("buy", "purchase", "order", "sale", "transaction", "checkout"),
    "return": ("return", "refund", "cancel", "cancellation"),
}
# strftime patterns tried in order when the times are not ISO 8601 (month-first before day-first: the
# UCI layout is '12/1/2010 8:26'; a sample that only day-first can read picks day-first).
TS_PATTERNS = (
    "%m/%d/%Y %H:%M", "%m/%d/%Y %H:%M:%S", "%d/%m/%Y %H:%M", "%d/%m/%Y %H:%M:%S", "%m/%d/%Y", "%d/%m/%Y",
    "%m/%d/%y %H:%M", "%d/%m/%y %H:%M", "%d.%m.%Y %H:%M", "%d.%m.%Y %H:%M:%S", "%d.%m.%Y",
    "%Y/%m/%d %H:%M", "%Y/%m/%d %H:%M:%S", "%Y/%m/%d", "%d-%m-%Y %H:%M", "%d-%m-%Y %H:%M:%S", "%d-%m-%Y",
    "%m-%d-%Y", "%d-%b-%Y %H:%M", "%d-%b-%Y", "%d %b %Y %H:%M", "%d %b %Y", "%b %d %Y %H:%M", "%Y%m%d",
)
WINDOW_MARGIN = dt.timedelta(days=1)


@dataclass(frozen=True)
class Proposal:
    """What `uservalue init` proposes: params by dotted key, the reasons, and the file's shape."""

    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    sample_rows: int = 0


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def file_format(path: Path) -> str:
    return "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"


def _sniff_csv(path: Path) -> tuple[str, bool]:
    """(delimiter, has header) from the file's first 64 KiB."""
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as handle:
        head = handle.read(65536)
    if not head.strip():
        raise InputError(path, "the file is empty", expected="a header and rows of transactions")
    try:
        dialect = csv.Sniffer().sniff(head, delimiters=",;\t|")
        delimiter = dialect.delimiter
    except csv.Error:
        delimiter = ","
    first = next(csv.reader(io.StringIO(head), delimiter=delimiter))
    # A header names columns: no cell of it reads as a number.
    header = not any(re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", cell) for cell in first)
    return delimiter, header


def read_sample(path: Path, rows: int = SAMPLE_ROWS) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The first `rows` rows as text (CSV) or their own types (Parquet), and how the file is laid out."""
    if not path.is_file():
        raise InputError(path, "file does not exist", expected="a CSV or Parquet file of transactions")
    fmt = file_format(path)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            reader = pq.ParquetFile(path)
            batch = next(reader.iter_batches(batch_size=rows), None)
        except (OSError, pa.ArrowException) as error:
            raise InputError(path, f"cannot read Parquet ({error})", expected="a Parquet file") from None
        frame = batch.to_pandas() if batch is not None else reader.schema_arrow.empty_table().to_pandas()
        return frame, {"format": "parquet"}
    delimiter, header = _sniff_csv(path)
    try:
        frame = pd.read_csv(path, sep=delimiter, header=0 if header else None, nrows=rows, dtype=str,
                            keep_default_na=False, encoding="utf-8-sig", encoding_errors="replace")
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read as CSV ({error})", expected=f"delimiter {delimiter!r}") from None
    if not header:
        frame.columns = [f"column{i}" for i in range(1, len(frame.columns) + 1)]
    return frame, {"format": "csv", "delimiter": delimiter, "header": header}


def _pick(columns: list[str], canonical: str, taken: set[str]) -> str | None:
    names = {_norm(c): c for c in columns if c not in taken}
    for candidate in NAME_CANDIDATES[canonical]:
        if candidate in names:
            return names[candidate]
    for candidate in NAME_CANDIDATES[canonical]:  # 'Customer ID (shop)', 'order_date_utc'
        for norm, column in names.items():
            if len(candidate) >= 4 and candidate in norm:
                return column
    return None


def _texts(values: pd.Series) -> pd.Series:
    return values.dropna().astype(str).str.strip().loc[lambda s: s != ""]


def detect_ts_format(values: pd.Series) -> tuple[str, str | None]:
    """(ts_format, a note when the choice was a guess) for sampled time values."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return "iso", None
    texts = _texts(values)
    if texts.empty:
        raise ValueError("no time values in the sample")
    if texts.str.fullmatch(r"\d{9,10}").all():
        return "unix_s", None
    if texts.str.fullmatch(r"\d{12,13}").all():
        return "unix_ms", None
    if pd.to_datetime(texts, format="ISO8601", errors="coerce", utc=True).notna().all():
        return "iso", None
    readable = [p for p in TS_PATTERNS if pd.to_datetime(texts, format=p, errors="coerce", utc=True).notna().all()]
    if not readable:
        raise ValueError(f"no known layout reads every sampled time (e.g. {texts.iloc[0]!r}); set "
                         "data.file.ts_format to a strftime pattern")
    chosen = readable[0]
    swapped = chosen.replace("%m", "%M_").replace("%d", "%m").replace("%M_", "%d")
    note = (f"day and month are ambiguous in every sampled time (e.g. {texts.iloc[0]!r}): chose {chosen!r}; "
            f"use {swapped!r} if days come first") if swapped in readable and swapped != chosen else None
    return chosen, note


def parse_times(values: pd.Series, ts_format: str) -> pd.Series:
    """Times as ingest reads them (uservalue.data.sources.tabular), UTC."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return pd.to_datetime(values, utc=True)
    texts = values.astype(str).str.strip()
    if ts_format in ("unix_s", "unix_ms"):
        return pd.to_datetime(pd.to_numeric(texts, errors="coerce"), unit="s" if ts_format == "unix_s" else "ms",
                              utc=True)
    return pd.to_datetime(texts, format="ISO8601" if ts_format == "iso" else ts_format, errors="coerce", utc=True)


def _time_batches(path: Path, layout: Mapping[str, Any], column: str, batch_rows: int = 500_000) -> Iterator[pd.Series]:
    if layout["format"] == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=[column]):
            yield batch.column(0).to_pandas()
        return
    reader = pd.read_csv(path, sep=layout["delimiter"], header=0 if layout["header"] else None, dtype=str,
                         keep_default_na=False, encoding="utf-8-sig", encoding_errors="replace",
                         chunksize=batch_rows,
                         usecols=[column] if layout["header"] else [int(column.removeprefix("column")) - 1])
    for chunk in reader:
        yield chunk.iloc[:, 0]


def time_range_of(path: Path, layout: Mapping[str, Any], column: str, ts_format: str
                  ) -> tuple[dt.datetime, dt.datetime, int]:
    """(first, last, unreadable values) over the whole time column, read in batches."""
    first = last = None
    unreadable = 0
    for values in _time_batches(path, layout, column):
        parsed = parse_times(values, ts_format)
        unreadable += int(parsed.isna().sum())
        parsed = parsed.dropna()
        if parsed.empty:
            continue
        low, high = parsed.min(), parsed.max()
        first = low if first is None or low < first else first
        last = high if last is None or high > last else last
    if first is None or last is None:
        raise InputError(path, f"no readable time in column {column!r}", column=column,
                         expected=f"times in the layout {ts_format!r}")
    return first.to_pydatetime(), last.to_pydatetime(), unreadable


def _behavior_map(values: pd.Series) -> dict[str, str]:
    """The file's behaviour names -> canonical ones, for the names the sample holds that read as one."""
    mapping = {}
    for name in sorted(_texts(values).unique())[:50]:
        norm = _norm(name)
        for canonical, words in BEHAVIOR_WORDS.items():
            if norm in words:
                mapping[name] = canonical
    return mapping


def _negative_share(values: pd.Series) -> float:
    numbers = pd.to_numeric(_texts(values), errors="coerce").dropna()
    return float((numbers < 0).mean()) if len(numbers) else 0.0


def _returns_column(sample: pd.DataFrame) -> tuple[str, str] | None:
    """(column, prefix) when an invoice-like column has letter-prefixed values among numeric ones."""
    for column in sample.columns:
        if _norm(str(column)) not in INVOICE_NAMES:
            continue
        texts = _texts(sample[column])
        prefixed = texts.str.extract(r"^([A-Za-z]+)\d+$")[0].dropna()
        if len(prefixed) and texts.str.fullmatch(r"\d+").any():
            return str(column), str(prefixed.mode().iloc[0])
    return None


def inspect_file(path: str | Path, *, display_path: str | None = None, overrides: Mapping[str, str | None] | None = None,
                 sample_rows: int = SAMPLE_ROWS, supported: tuple[str, ...] | None = None,
                 behaviors: tuple[str, ...] = ("view", "fav", "cart", "buy")) -> Proposal:
    """The params that read `path` as a `file` source. `overrides`: canonical column -> the file's column
    (None: the file has none), winning over the guesses. `supported`: the data.file keys this version's
    params know (purchase-only defaults, unit prices, returns and guest lines need theirs)."""
    from uservalue.data.window import floor_day

    path = Path(path)
    sample, layout = read_sample(path, sample_rows)
    columns = [str(c) for c in sample.columns]
    known = set(supported) if supported is not None else {"default_behavior", "unit_price", "returns", "missing_user"}
    notes: list[str] = []
    mapping: dict[str, str | None] = {}
    taken: set[str] = set()
    overrides = dict(overrides or {})
    for name, column in overrides.items():
        if name not in NAME_CANDIDATES:
            raise ConfigError(f"--column {name}=...: unknown canonical column; known: {list(NAME_CANDIDATES)}")
        if column is not None and column not in columns:
            raise ConfigError(f"--column {name}={column}: {path} has no such column; it has {columns}")
    for canonical in NAME_CANDIDATES:
        if canonical == "unit_price" and "unit_price" not in known:
            continue
        if canonical in overrides:
            mapping[canonical] = overrides[canonical]
        else:
            mapping[canonical] = _pick(columns, canonical, taken)
        if mapping[canonical]:
            taken.add(mapping[canonical])  # type: ignore[arg-type]
    for required, what in (("user_id", "the customer id"), ("ts", "the time of each line")):
        if not mapping.get(required):
            raise InputError(path, f"cannot tell which column is {what} among {columns}", column=required,
                             expected=f"a column named like {list(NAME_CANDIDATES[required][:4])}, or "
                                      f"`--column {required}=<your column>`")
    try:
        ts_format, note = detect_ts_format(sample[mapping["ts"]])
    except ValueError as error:
        raise InputError(path, f"column {mapping['ts']!r}: {error}", column=mapping["ts"],
                         expected="ISO 8601, unix seconds or milliseconds, or a date layout") from None
    if note:
        notes.append(note)
    first, last, unreadable = time_range_of(path, layout, mapping["ts"], ts_format)  # type: ignore[arg-type]
    if unreadable:
        notes.append(f"{unreadable} values of {mapping['ts']!r} do not read as {ts_format!r}: ingest will stop at "
                     "the first one (its row is named)")
    settings: dict[str, Any] = {"data.source": "file", "data.path": display_path or str(path),
                                "data.file.format": layout["format"]}
    if layout["format"] == "csv":
        settings["data.file.delimiter"] = layout["delimiter"]
        settings["data.file.header"] = layout["header"]
    settings["data.file.ts_format"] = ts_format
    if mapping["amount"] and mapping.get("unit_price"):
        notes.append(f"both an amount ({mapping['amount']!r}) and a unit price ({mapping['unit_price']!r}): "
                     "the amount is used")
    if not mapping["amount"] and not mapping.get("unit_price"):
        notes.append("no amount or price column: every purchase is worth data.file.purchase_amount")
    settings["data.file.columns"] = {c: mapping.get(c) for c in NAME_CANDIDATES if c in mapping}
    behavior_names = list(behaviors)
    if mapping["behavior"]:
        found = _behavior_map(sample[mapping["behavior"]])
        unknown = sorted(set(_texts(sample[mapping["behavior"]]).unique()) - set(found))[:10]
        if found:
            settings["data.file.behaviors"] = found
        if unknown:
            notes.append(f"behaviour values {unknown} read as none of {list(BEHAVIOR_WORDS)}: map them in "
                         "data.file.behaviors")
        if "default_behavior" in known:
            settings["data.file.default_behavior"] = None
    elif "default_behavior" in known:
        settings["data.file.default_behavior"] = "buy"
        notes.append("no behaviour column: every line is a purchase (data.file.default_behavior: buy)")
    returns = _returns_column(sample) if "returns" in known else None
    negative = max((_negative_share(sample[mapping[c]]) for c in ("quantity", "amount") if mapping.get(c)),
                   default=0.0)
    if "returns" in known:
        settings["data.file.returns"] = {"column": returns[0], "prefix": returns[1]} if returns else None
        if returns:
            notes.append(f"values of {returns[0]!r} starting with {returns[1]!r} mark returns")
        if returns or negative:
            if "return" not in behavior_names:
                behavior_names.append("return")
            settings["data.behaviors"] = behavior_names
            if negative:
                notes.append(f"{negative:.1%} of sampled lines have a negative quantity or amount: read as returns")
    if "missing_user" in known:
        guests = int((sample[mapping["user_id"]].astype(str).str.strip().isin(["", "nan", "None"])).sum())  # type: ignore[index]
        settings["data.file.missing_user"] = "drop" if guests else "error"
        if guests:
            notes.append(f"{guests} of {len(sample)} sampled lines have no {mapping['user_id']!r} (guests): "
                         "dropped and counted (data.file.missing_user: drop)")
    lower = floor_day(first) - WINDOW_MARGIN
    upper = floor_day(last) + dt.timedelta(days=1) + WINDOW_MARGIN
    settings["validate.ts_min"] = lower.strftime("%Y-%m-%dT%H:%M:%SZ")
    settings["validate.ts_max"] = upper.strftime("%Y-%m-%dT%H:%M:%SZ")
    notes.append(f"times run from {first.isoformat()} to {last.isoformat()}; split `auto` derives the cutoffs "
                 "from them (reports/split.json after featurize, `uservalue plan` before)")
    return Proposal(settings=settings, notes=notes, columns=columns, sample_rows=len(sample))


def _yaml() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long comment or value
    yaml.representer.add_representer(
        type(None), lambda representer, _data: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def _node(value: Any) -> Any:
    """Mappings and lists written on one line, as params.yaml writes its small ones."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, Mapping):
        node = CommentedMap((k, _node(v)) for k, v in value.items())
        node.fa.set_flow_style()
        return node
    if isinstance(value, (list, tuple)):
        node = CommentedSeq(_node(v) for v in value)
        node.fa.set_flow_style()
        return node
    return value


def updated_params_text(text: str, settings: Mapping[str, Any], source: str = "params.yaml") -> str:
    """params.yaml text with each dotted key set; comments, order and layout of everything else kept.
    A missing section is an error; a missing leaf key is added."""
    yaml = _yaml()
    document = yaml.load(text)
    if not isinstance(document, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections")
    for dotted, value in settings.items():
        *parents, leaf = dotted.split(".")
        target = document
        for depth, part in enumerate(parents):
            if not isinstance(target.get(part), Mapping):
                raise ConfigError(f"{source}: no section {'.'.join(parents[:depth + 1])!r} to write {dotted} into")
            target = target[part]
        current = target.get(leaf)
        if isinstance(value, Mapping) and isinstance(current, Mapping) and not getattr(current.fa, "_flow_style", None):
            for key, item in value.items():  # a block mapping stays one, its comments and other keys kept
                current[key] = _node(item)
        else:
            target[leaf] = _node(value)
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()


def write_settings(params_path: str | Path, settings: Mapping[str, Any]) -> str:
    """Write `settings` (dotted key -> value) into params.yaml atomically, after checking the result parses
    as params; returns the new text."""
    import yaml as pyyaml

    from uservalue.config import parse_params
    from uservalue.io import write_text

    path = Path(params_path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file does not exist")
    text = updated_params_text(path.read_text(), settings, str(path))
    parse_params(pyyaml.safe_load(text) or {}, f"{path} (as `uservalue init` would write it)")
    write_text(path, text)
    return text
