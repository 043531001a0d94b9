"""Sources: every raw format becomes one canonical events table (see uservalue.schema)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from uservalue.config import DataParams
from uservalue.io import atomic_dir, write_json
from uservalue.data.sources.cdnow import read_cdnow
from uservalue.data.sources.event_log import event_log_files, read_event_log
from uservalue.data.sources.tabular import TabularSpec, read_canonical
from uservalue.data.sources.taobao import taobao_spec
from uservalue.data.sources.writer import write_sorted_events


@dataclass(frozen=True)
class IngestResult:
    source: str
    events: int
    out: Path


def file_spec(params: DataParams) -> TabularSpec:
    f = params.file
    return TabularSpec(
        columns=f.columns,
        behaviors=f.behaviors,
        ts_format=f.ts_format,
        params_hint="data.file.behaviors / data.file.columns",
        header=f.header,
        delimiter=f.delimiter,
        headerless_names=tuple(v for v in f.columns.values() if v) if not f.header else (),
        purchase_amount=f.purchase_amount,
    )


def _tables(params: DataParams) -> Iterator[pa.Table]:
    if params.source == "cdnow":
        yield from read_cdnow()
    elif params.source == "taobao":
        yield from read_canonical(params.path, taobao_spec(params), fmt="csv")
    elif params.source == "file":
        yield from read_canonical(params.path, file_spec(params), fmt=params.file.format)
    else:  # pragma: no cover - synthetic is handled by ingest() itself
        raise AssertionError(params.source)


def ingest(params: DataParams, out: str | Path, truth_dir: str | Path) -> IngestResult:
    """Turn the configured source into `out` (sorted canonical events) and its `truth_dir`.

    `truth_dir` holds the generator's planted truth for the synthetic source and, for real
    sources, a truth.json that says there is none (so the DVC output always exists). When
    `params.event_log` names an existing event log, its events are appended to the source's.
    """
    out, truth_dir = Path(out), Path(truth_dir)
    logged = read_event_log(params.event_log) if event_log_files(params.event_log) else None
    if params.source == "synthetic":
        from uservalue.data.sources.synthetic import generate

        if logged is None:
            result = generate(params.synthetic, out, truth_dir, behaviors=params.behaviors)
            return IngestResult("synthetic", result.events, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
            generated = Path(scratch) / "synthetic.parquet"
            generate(params.synthetic, generated, truth_dir, behaviors=params.behaviors)
            batches = (pa.Table.from_batches([b]) for b in pq.ParquetFile(generated).iter_batches(1_000_000))
            events = write_sorted_events(chain(batches, logged), out, source="synthetic + event log")
        return IngestResult("synthetic", events, out)
    described = params.path if params.source in ("taobao", "file") else "cdnow"
    tables = _tables(params) if logged is None else chain(_tables(params), logged)
    events = write_sorted_events(tables, out, source=str(described))

    with atomic_dir(truth_dir) as tmp:
        write_json(tmp / "truth.json", {"source": params.source, "planted": False})
    return IngestResult(params.source, events, out)


__all__ = ["IngestResult", "file_spec", "ingest"]
