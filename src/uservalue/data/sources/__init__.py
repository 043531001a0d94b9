"""Sources: every raw format becomes one canonical events table (see uservalue.schema)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from uservalue.config import DataParams
from uservalue.data.sources.cdnow import read_cdnow
from uservalue.data.sources.event_log import event_log_files, read_event_log
from uservalue.data.sources.tabular import RejectSink, TabularSpec, read_canonical
from uservalue.data.sources.taobao import taobao_spec
from uservalue.data.sources.writer import write_sorted_events
from uservalue.io import atomic_dir, write_json
from uservalue.schema import RETURN

REJECTS_NAME = "rejects.csv"


@dataclass(frozen=True)
class IngestResult:
    source: str
    events: int
    out: Path
    rejected: dict[str, int] = field(default_factory=dict)  # lines set aside, per reason
    rejects: Path | None = None  # the file that holds them (row, reason, the line's columns)

    def summary(self) -> dict[str, object]:
        """What reports/ingest.json holds."""
        return {"source": self.source, "events": self.events, "rejected": sum(self.rejected.values()),
                "rejected_by_reason": dict(self.rejected), "rejects": str(self.rejects) if self.rejects else None}


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
        default_behavior=f.default_behavior,
        missing_user=f.missing_user,
        returns=RETURN in params.behaviors,
        returns_column=f.returns.column if f.returns else None,
        returns_prefix=f.returns.prefix if f.returns else None,
        id_normalize=f.id_normalize,
        returns_hint=f" (or add '{RETURN}' to data.behaviors to read negative lines as returns)",
    )


def _tables(params: DataParams, rejects: RejectSink) -> Iterator[pa.Table]:
    if params.source == "cdnow":
        yield from read_cdnow()
    elif params.source == "taobao":
        yield from read_canonical(params.path, taobao_spec(params), fmt="csv")
    elif params.source == "file":
        yield from read_canonical(params.path, file_spec(params), fmt=params.file.format, rejects=rejects)
    else:  # pragma: no cover - synthetic is handled by ingest() itself
        raise AssertionError(params.source)


def ingest(params: DataParams, out: str | Path, truth_dir: str | Path,
           rejects_out: str | Path | None = None) -> IngestResult:
    """Turn the configured source into `out` (sorted canonical events) and its `truth_dir`.

    `truth_dir` holds the generator's planted truth for the synthetic source and, for real
    sources, a truth.json that says there is none (so the DVC output always exists). When
    `params.event_log` names an existing event log, its events are appended to the source's.
    `rejects_out` (a CSV) receives the lines the source sets aside (a file's guest lines under
    `data.file.missing_user: drop`) with their row and reason (default: rejects.csv beside `out`); it
    is written for every source, with a header alone when nothing was set aside (a DVC output).
    """
    out, truth_dir = Path(out), Path(truth_dir)
    rejects_out = Path(rejects_out) if rejects_out is not None else out.with_name(REJECTS_NAME)
    rejects = RejectSink(rejects_out)
    try:
        result = _ingest(params, out, truth_dir, rejects)
    except BaseException:
        rejects.discard()
        raise
    rejects.close()
    return IngestResult(result.source, result.events, out, dict(rejects.counts), rejects_out)


def _ingest(params: DataParams, out: Path, truth_dir: Path, rejects: RejectSink) -> IngestResult:
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
    tables = _tables(params, rejects) if logged is None else chain(_tables(params, rejects), logged)
    events = write_sorted_events(tables, out, source=str(described))

    with atomic_dir(truth_dir) as tmp:
        write_json(tmp / "truth.json", {"source": params.source, "planted": False})
    return IngestResult(params.source, events, out)


__all__ = ["REJECTS_NAME", "IngestResult", "file_spec", "ingest"]
