"""The pooled item-text columns online (issue 23): the same numbers as the batch join
(uservalue.text.features.user_text_features) from the events the service holds for a user (stored, sent,
or both), for a model whose FeatureSpec names text columns. features.online.online_arrays calls
`pooled_text_columns` once per batch; nothing here runs for a model without text columns.

Which vectors: a model's FeatureSpec names the sha256 of the vectors file it was trained with
(`text_vectors`), and the saved model carries a copy (ITEM_VECTORS_FILE, so the MLflow artifact and the
Bento serve without the project); loading it registers that copy (`register_item_vectors`). Without a
registered copy: those `install_item_vectors` loaded, else the embed_items output of the project
(`$USERVALUE_ITEM_VECTORS`, else `$USERVALUE_PROJECT_DIR/data/item_vectors.parquet`, else
`data/item_vectors.parquet` under the working directory), read once per process and file version, and
refused when its digest is not the model's (a later embed_items run: stale vectors would give other numbers).
The vectors file says which features it is for (behaviours, last L, components: TextFeatureSpec); it must
give exactly the model's text columns, else a ConfigError says what differs."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from uservalue.errors import ConfigError
from uservalue.io import file_sha256
from uservalue.text.embed import TextFeatureSpec, read_item_vectors, read_text_spec

DEFAULT_VECTORS = Path("data") / "item_vectors.parquet"
ITEM_VECTORS_FILE = "item_vectors.parquet"  # the copy inside a saved model's directory
ENV_VECTORS = "USERVALUE_ITEM_VECTORS"
ENV_PROJECT = "USERVALUE_PROJECT_DIR"
_DICT_LOOKUPS = 2048  # events up to which pooled_text_columns looks rows up in dicts (pandas' indexes beyond)


@dataclass(frozen=True)
class ItemVectors:
    """item_id -> row of `matrix` (rows in item_id order, as embed_items writes them), and the features."""

    path: Path
    row: dict[str, int]
    matrix: np.ndarray  # float32 [items, dim]
    spec: TextFeatureSpec
    digest: str  # sha256 of the file (FeatureSpec.text_vectors of the features made from it)

    @functools.cached_property
    def item_index(self) -> pd.Index:
        """item_id -> row as a hash index: the rows of many events in one vectorised lookup."""
        return pd.Index(list(self.row), dtype=object)

    @property
    def columns(self) -> tuple[str, ...]:
        from uservalue.text.features import text_feature_columns

        dim = min(self.spec.dim, self.matrix.shape[1])
        return tuple(text_feature_columns(self.spec.behaviors, dim))

    @classmethod
    def load(cls, path: str | Path) -> ItemVectors:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: the model reads item-text columns but the item vectors file does not exist "
                              f"(run the embed_items stage, or set {ENV_VECTORS})")
        spec = read_text_spec(path)
        if spec is None:
            raise ConfigError(f"{path}: no text_features metadata (re-run `dvc repro embed_items`)")
        items, matrix = read_item_vectors(path)
        return cls(path, {item: i for i, item in enumerate(items)}, matrix, spec, file_sha256(path))


_lock = threading.Lock()
_installed: ItemVectors | None = None
_loaded: dict[tuple[str, int, int], ItemVectors] = {}
_registered: dict[str, ItemVectors] = {}  # digest -> the copy a loaded model carries


def register_item_vectors(path: str | Path, digest: str = "") -> ItemVectors:
    """Make the vectors of `path` (a saved model's copy) the ones for features of their digest in this
    process; `digest`: the one the model expects (a ConfigError when the file is not it)."""
    vectors = ItemVectors.load(path)
    if digest and vectors.digest != digest:
        raise ConfigError(f"{path}: these item vectors (sha256 {vectors.digest[:12]}) are not the ones the model was "
                          f"trained with ({digest[:12]}): the model directory was altered")
    with _lock:
        _registered[vectors.digest] = vectors
    return vectors


def install_item_vectors(path: str | Path | None) -> ItemVectors | None:
    """Use the vectors of `path` for every model with text columns in this process (None: back to the default)."""
    global _installed
    with _lock:
        _installed = None if path is None else ItemVectors.load(path)
        return _installed


def default_vectors_path() -> Path:
    if os.environ.get(ENV_VECTORS):
        return Path(os.environ[ENV_VECTORS])
    return Path(os.environ.get(ENV_PROJECT) or ".") / DEFAULT_VECTORS


def item_vectors_for(text_columns: Sequence[str], digest: str = "") -> ItemVectors:
    """The vectors that give exactly `text_columns`, of sha256 `digest` when one is given (a ConfigError
    otherwise): a registered model copy first, then the installed or the project's file."""
    vectors = _registered.get(digest) if digest else None
    if vectors is None:
        vectors = _installed
    if vectors is None:
        path = default_vectors_path()
        try:
            stat = path.stat()
            key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = (str(path), 0, 0)
        with _lock:
            vectors = _loaded.get(key)
            if vectors is None:
                vectors = ItemVectors.load(path)
                _loaded.clear()
                _loaded[key] = vectors
    if digest and vectors.digest != digest:
        raise ConfigError(f"{vectors.path}: these item vectors (sha256 {vectors.digest[:12]}) are not the ones the "
                          f"model was trained with ({digest[:12]}; embed_items has run since): load the model from "
                          f"its directory (it carries its own copy, {ITEM_VECTORS_FILE}) or retrain it")
    if vectors.columns != tuple(text_columns):
        raise ConfigError(f"{vectors.path}: its text features ({', '.join(vectors.spec.behaviors)}; "
                          f"{vectors.spec.dim} components) are not the model's text columns "
                          f"({len(text_columns)}: {', '.join(list(text_columns)[:3])}, ...): score with the vectors "
                          f"the model was trained with")
    return vectors


def pooled_text_columns(text_columns: Sequence[str], events: Any, T: float, users: np.ndarray,
                        digest: str = "") -> dict[str, np.ndarray]:
    """`text_columns` for `users` (the output rows, sorted user ids) from `events` (features.online.EventColumns)
    before epoch second `T`: per behaviour the mean of the vectors of the user's last L items with a vector
    (latest first, ties by item_id), 0 where the user has none; float64, as the batch join."""
    vectors = item_vectors_for(text_columns, digest)
    spec, dim = vectors.spec, min(vectors.spec.dim, vectors.matrix.shape[1])
    n_users, n_behaviors = len(users), len(spec.behaviors)
    out = np.zeros((n_users, n_behaviors, dim), np.float64)
    behavior_id = {b: i for i, b in enumerate(spec.behaviors)}
    t = np.asarray(events.t, dtype=np.float64)
    keep = np.flatnonzero(t < T)
    item_ids, user_ids = events.item_id[keep], events.user_id[keep]
    if len(keep) > _DICT_LOOKUPS:  # hash lookups in pandas: a dict per event costs ~1 us each in Python
        rows = vectors.item_index.get_indexer(item_ids).astype(np.int64, copy=False)
        owners = pd.Index(users, dtype=object).get_indexer(user_ids).astype(np.int64, copy=False)
    else:  # a few users' events (one request): building the indexes would cost more than the lookups
        user_row = {u: i for i, u in enumerate(users)}
        rows = np.array([vectors.row.get(i, -1) if i is not None else -1 for i in item_ids], dtype=np.int64)
        owners = np.array([user_row.get(u, -1) for u in user_ids], dtype=np.int64)
    behaviors = np.full(len(keep), -1, dtype=np.int64)  # a behaviour not pooled: -1
    kinds = events.behavior[keep]
    for b, i in behavior_id.items():
        behaviors[kinds == b] = i
    use = (rows >= 0) & (behaviors >= 0) & (owners >= 0)
    keep, rows, behaviors, owners = keep[use], rows[use], behaviors[use], owners[use]
    if len(keep):
        # Group by (user, behaviour), latest first, ties by item_id (the rows are in item_id order).
        order = np.lexsort((rows, -t[keep], behaviors, owners))
        group = owners[order] * n_behaviors + behaviors[order]
        starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        position = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
        chosen = order[position < spec.last]  # still grouped, in group order
        flat = owners[chosen] * n_behaviors + behaviors[chosen]
        first = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
        # Per group the sum of its vectors in one segmented reduction (np.add.at was 30% of 1,000 users' time).
        sums = np.add.reduceat(vectors.matrix[rows[chosen], :dim].astype(np.float64), first, axis=0)
        counts = np.diff(np.r_[first, len(flat)])
        pooled = np.zeros((n_users * n_behaviors, dim), np.float64)
        pooled[flat[first]] = sums / counts[:, None]
        out = pooled.reshape(n_users, n_behaviors, dim)
    flat_out = out.reshape(n_users, n_behaviors * dim)
    return {column: flat_out[:, j] for j, column in enumerate(text_columns)}


__all__ = ["ITEM_VECTORS_FILE", "ItemVectors", "default_vectors_path", "install_item_vectors", "item_vectors_for",
           "pooled_text_columns", "register_item_vectors", "with_text_columns"]


def with_text_columns(features: Any, events: Any, text_columns: Sequence[str], digest: str = "") -> Any:
    """Batch feature rows (a DataFrame of user_id at cutoff) with the model's text columns joined from the
    project's item vectors: what `score` and the monitor score a text model with (the featurize join's numbers)."""
    import tempfile

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from uservalue.text.features import add_text_features

    vectors = item_vectors_for(text_columns, digest)
    spec = vectors.spec
    if isinstance(events, str | Path):
        return add_text_features(features, events, vectors.path, spec.behaviors, spec.last, spec.dim)
    with tempfile.TemporaryDirectory(prefix="uservalue-text-") as tmp:  # the join reads events from Parquet
        path = Path(tmp) / "events.parquet"
        table = events if isinstance(events, pa.Table) else pa.Table.from_pandas(pd.DataFrame(events),
                                                                                  preserve_index=False)
        pq.write_table(table, path)
        return add_text_features(features, path, vectors.path, spec.behaviors, spec.last, spec.dim)
