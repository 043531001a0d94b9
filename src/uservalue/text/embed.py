"""The embed_items stage: one vector per distinct item text, through the shipped encoder (uservalue.text.model).

Each item's text is its latest non-empty `item_text` in the events. Vectors are cached by a hash of the text
(under `embed_items.cache_dir`, one file per model version), so a rerun embeds only texts it has not seen.
The output is a Parquet table `item_id -> vector` (float32), reduced by PCA to `embed_items.pca_dim`
components (fitted on the distinct texts; zero-padded when there are fewer texts than that) or the model's
384. A log without item text gives the same table with no rows and a summary that says why, without
loading the model: the default pipeline pays nothing for the stage."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uservalue.config import EmbedItemsParams
from uservalue.duck import connect, sql_string
from uservalue.errors import InputError
from uservalue.io import atomic_path
from uservalue.schema import ITEM_TEXT
from uservalue.text.model import DIM, model_id

VECTOR = "vector"


@dataclass(frozen=True)
class EmbedSummary:
    """What reports/embed_items.json holds (the stage's metrics)."""

    items: int  # items with a text
    texts: int  # distinct texts among them
    embedded: int  # texts run through the model this time
    cached: int  # texts found in the cache
    dim: int  # size of the output vectors
    seconds: float  # wall time of the stage (model load and embedding included)
    embed_seconds: float  # time in the model's forward passes
    texts_per_s: float  # embedded / embed_seconds (0 when nothing was embedded)
    device: str | None
    model: str
    skipped: str | None = None  # why nothing was embedded (no item text), else None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def output_dim(cfg: EmbedItemsParams) -> int:
    return cfg.pca_dim or DIM


@dataclass(frozen=True)
class TextFeatureSpec:
    """Which pooled text features the vectors are for (embed_items.feature_*): the mean of each user's last
    `last` items' vectors per behaviour of `behaviors`, leading `dim` components. Kept in the vectors file's
    metadata, so featurize (batch) and the service (online) read one definition from one file."""

    behaviors: tuple[str, ...]
    last: int
    dim: int

    @classmethod
    def from_params(cls, cfg: EmbedItemsParams) -> TextFeatureSpec:
        return cls(tuple(cfg.feature_behaviors), cfg.feature_last, min(cfg.feature_dim, output_dim(cfg)))


def vectors_schema(dim: int, features: TextFeatureSpec | None = None) -> pa.Schema:
    metadata = {b"model": model_id().encode(), b"dim": str(dim).encode()}
    if features is not None:
        metadata[b"text_features"] = json.dumps(asdict(features)).encode()
    return pa.schema([pa.field("item_id", pa.string(), nullable=False),
                      pa.field(VECTOR, pa.list_(pa.float32(), dim), nullable=False)], metadata=metadata)


def read_text_spec(path: str | Path) -> TextFeatureSpec | None:
    """The text features the vectors file is for; None when it was written without them."""
    raw = (pq.read_schema(path).metadata or {}).get(b"text_features")
    if raw is None:
        return None
    try:
        values = json.loads(raw)
        return TextFeatureSpec(tuple(values["behaviors"]), int(values["last"]), int(values["dim"]))
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(path, f"unreadable text_features metadata ({error})",
                         expected="the embed_items stage's output") from None


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def item_texts(events: str | Path) -> pa.Table | None:
    """(item_id, item_text): each item's latest non-empty text; None when the events have no text column."""
    events = Path(events)
    if not events.is_file():
        raise InputError(events, "file does not exist", expected="the validated events (`uservalue validate`)")
    if ITEM_TEXT not in pq.read_schema(events).names:
        return None
    con = connect()
    try:
        return con.sql(f"""
            SELECT item_id, arg_max({ITEM_TEXT}, ts) AS {ITEM_TEXT}
            FROM read_parquet({sql_string(str(events))})
            WHERE item_id IS NOT NULL AND {ITEM_TEXT} IS NOT NULL AND trim({ITEM_TEXT}) <> ''
            GROUP BY item_id ORDER BY item_id
        """).to_arrow_table()
    finally:
        con.close()


class VectorCache:
    """Vectors of texts already embedded, by text hash: `<cache_dir>/vectors/<model id>.parquet`."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.path = Path(cache_dir) / "vectors" / f"{model_id()}.parquet"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path.is_file():
            table = pq.read_table(self.path)
            matrix = _matrix(table.column(VECTOR), DIM)
            self.vectors = dict(zip(table.column("text_hash").to_pylist(), matrix, strict=True))

    def save(self) -> None:
        hashes = sorted(self.vectors)
        matrix = np.stack([self.vectors[h] for h in hashes]) if hashes else np.zeros((0, DIM), np.float32)
        table = pa.table({"text_hash": pa.array(hashes, pa.string()), VECTOR: _fixed_list(matrix)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            pq.write_table(table, tmp, compression="zstd")


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def _matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return np.zeros((0, dim), np.float32)
    return array.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(array), -1)


def read_item_vectors(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(item ids, their vectors as a float32 matrix) from the stage's output."""
    table = pq.read_table(path)
    dim = table.schema.field(VECTOR).type.list_size
    return table.column("item_id").to_pylist(), _matrix(table.column(VECTOR), dim)


def reduce(vectors: np.ndarray, dim: int | None, seed: int = 0) -> np.ndarray:
    """PCA to `dim` components (zero-padded when the texts are fewer), or the vectors as they are."""
    if not dim or dim >= vectors.shape[1]:
        return vectors.astype(np.float32)
    out = np.zeros((vectors.shape[0], dim), np.float32)
    components = min(dim, vectors.shape[0] - 1)
    if components >= 1:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=components, svd_solver="full", random_state=seed)
        out[:, :components] = pca.fit_transform(vectors.astype(np.float64)).astype(np.float32)
    return out


def write_empty(out: Path, dim: int, features: TextFeatureSpec | None = None) -> None:
    with atomic_path(out) as tmp:
        pq.write_table(vectors_schema(dim, features).empty_table(), tmp)


Log = Callable[[str], None]


def embed_items(events: str | Path, out: str | Path, cfg: EmbedItemsParams, log: Log = lambda _: None) -> EmbedSummary:
    """Write `out` (item_id -> vector) for the items of `events` that have a text; see the module doc."""
    started = time.perf_counter()
    out, dim = Path(out), output_dim(cfg)
    table = item_texts(events)
    if table is None or table.num_rows == 0:
        reason = (f"the events have no {ITEM_TEXT} column (map one with data.file.columns.{ITEM_TEXT})"
                  if table is None else f"no item has a non-empty {ITEM_TEXT}")
        write_empty(out, dim, TextFeatureSpec.from_params(cfg))
        log(f"embed_items: skipped, {reason}; wrote an empty {out}")
        return EmbedSummary(0, 0, 0, 0, dim, round(time.perf_counter() - started, 3), 0.0, 0.0, None, model_id(),
                            skipped=reason)
    texts = table.column(ITEM_TEXT).to_pylist()
    hashes = [text_hash(t) for t in texts]
    distinct = dict(zip(hashes, texts, strict=True))  # hash -> text, each once
    cache = VectorCache(cfg.cache_dir)
    todo = [h for h in distinct if h not in cache.vectors]
    device, embed_seconds = None, 0.0
    if todo:
        from uservalue.text.model import load_encoder

        encoder = load_encoder(cfg.cache_dir, cfg.device, cfg.max_length)
        device = encoder.device
        t0 = time.perf_counter()
        vectors = encoder.encode([distinct[h] for h in todo], cfg.batch_size)
        embed_seconds = time.perf_counter() - t0
        cache.vectors.update(zip(todo, vectors, strict=True))
        cache.save()
    order = sorted(distinct)
    reduced = reduce(np.stack([cache.vectors[h] for h in order]), cfg.pca_dim, cfg.seed)
    row = {h: i for i, h in enumerate(order)}
    matrix = reduced[[row[h] for h in hashes]]
    with atomic_path(out) as tmp:
        pq.write_table(pa.table({"item_id": table.column("item_id"), VECTOR: _fixed_list(matrix)},
                                schema=vectors_schema(matrix.shape[1], TextFeatureSpec.from_params(cfg))), tmp,
                       compression="zstd")
    rate = len(todo) / embed_seconds if embed_seconds > 0 else 0.0
    summary = EmbedSummary(table.num_rows, len(distinct), len(todo), len(distinct) - len(todo), int(matrix.shape[1]),
                           round(time.perf_counter() - started, 3), round(embed_seconds, 3), round(rate, 1),
                           device, model_id())
    log(f"embed_items: {summary.items} items, {summary.texts} distinct texts, {summary.embedded} embedded "
        f"({summary.texts_per_s:.1f} texts/s on {device or 'no device: all cached'}), {summary.cached} from the "
        f"cache, vectors of {summary.dim} in {summary.seconds:.2f} s -> {out}")
    return summary


__all__ = ["VECTOR", "EmbedSummary", "TextFeatureSpec", "VectorCache", "embed_items", "item_texts",
           "read_item_vectors", "read_text_spec", "reduce", "text_hash", "vectors_schema", "write_empty"]
