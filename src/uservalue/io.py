"""Atomic writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _temporary_sibling(final: Path) -> Path:
    # Same directory as the target so os.replace stays a rename on one filesystem.
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it over `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; swap it in for `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            old = _temporary_sibling(final)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str, *, mode: int | None = None) -> None:
    """Replace `path` with `text` atomically; `mode` (e.g. 0o600) holds from the file's creation on."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)


def write_json(path: str | Path, payload: Any, *, mode: int | None = None) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", mode=mode)


def file_sha256(path: str | Path, chunk_bytes: int = 8 << 20) -> str:
    """sha256 of a file's bytes, read `chunk_bytes` at a time (manifests, the item vectors a model carries)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
