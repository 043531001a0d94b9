"""Outputs that live outside the workspace: the manifest pattern (issue 14; README "Ingest and validation
on Spark").

When a data stage's output path names a manifest (`*.manifest.json`, e.g. `data/events.manifest.json`),
its Parquet is written under params `data.external_root` (a folder outside the workspace: a mounted share,
a scratch disk, the local side of a cluster's storage) and the stage's DVC output is the small JSON
manifest, kept in the workspace (and in git, `cache: false`):

    {"format": "uservalue.parquet-manifest/1", "root": "/abs/root", "rows": N, "sha256": "<content hash>",
     "files": [{"path": "events.parquet", "size": ..., "rows": ..., "footer_sha256": ..., "sha256": ...}]}

`sha256` covers the sorted (relative path, size, sha256 of the file's bytes) of every file, so the manifest
changes exactly when the data does: `dvc repro` reruns the stages downstream of a changed output, and a
rerun that rewrites identical data leaves them cached. Each file's bytes are read once, by the writer of
the manifest (the stage that wrote them does not read them back); row counts come from the Parquet footers.

A downstream stage resolves its input through the manifest (resolve_input): it checks every file is there
with its recorded size and footer (cheap: the footer holds every row group's offsets, sizes and column
statistics), so data changed behind the manifest's back is an error naming the file, not a silent
rerun on other data; verify(content=True) re-hashes every byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from uservalue.errors import ConfigError, InputError
from uservalue.io import file_sha256, write_json

FORMAT = "uservalue.parquet-manifest/1"
SUFFIX = ".manifest.json"
FOOTER_TAIL = 8  # a Parquet file ends with the footer's length (4 bytes, little-endian) and b"PAR1"


@dataclass(frozen=True)
class ManifestFile:
    """One Parquet file of an external output, relative to the manifest's root."""

    path: str
    size: int
    rows: int
    footer_sha256: str
    sha256: str


@dataclass(frozen=True)
class Manifest:
    root: str
    files: tuple[ManifestFile, ...]
    rows: int
    sha256: str

    def locations(self) -> list[Path]:
        """The files' absolute paths, in the manifest's (sorted) order."""
        return [Path(self.root) / entry.path for entry in self.files]

    def location(self) -> Path:
        """The one file of a single-file output (every data stage writes one file per output)."""
        if len(self.files) != 1:
            raise InputError(self.root, f"the manifest lists {len(self.files)} files",
                             expected="exactly one Parquet file (a single-file stage output)")
        return self.locations()[0]


def is_manifest(path: str | Path) -> bool:
    """Whether a stage's output or input path names a manifest (`*.manifest.json`)."""
    return str(path).endswith(SUFFIX)


def external_root(root: str | None, manifest: str | Path) -> Path:
    """The folder of params `data.external_root` as a local path: a plain path or a file:// URL.
    Other schemes (s3a://, hdfs://) are not written by this version: mount them, or see the README."""
    if not root:
        raise ConfigError(f"{manifest} names a manifest ({SUFFIX}): set data.external_root, the folder outside "
                          "the workspace that holds the Parquet it describes")
    if root.startswith("file://"):
        root = root.removeprefix("file://")
    elif "://" in root:
        raise ConfigError(f"data.external_root {root!r}: only a local or mounted folder (or file://) is written "
                          "by this version; mount the store (s3fs, an HDFS NFS gateway) and give its path")
    return Path(root).expanduser().resolve()


def external_target(out: str | Path, root: str | None) -> Path:
    """Where a stage writes the output `out`: `out` itself, or, when `out` names a manifest, the Parquet
    file `<data.external_root>/<name>.parquet` (`data/events.manifest.json` -> `<root>/events.parquet`)."""
    if not is_manifest(out):
        return Path(out)
    folder = external_root(root, out)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (Path(out).name.removesuffix(SUFFIX) + ".parquet")


def footer_sha256(path: Path) -> str:
    """sha256 of the file's Parquet footer (its metadata: schema, row groups, offsets, statistics)."""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size < 2 * FOOTER_TAIL:
            raise InputError(path, f"{size} bytes: not a Parquet file", expected="a Parquet file")
        handle.seek(size - FOOTER_TAIL)
        tail = handle.read(FOOTER_TAIL)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or length > size - FOOTER_TAIL:
            raise InputError(path, "no Parquet footer at the end of the file", expected="a Parquet file")
        handle.seek(size - FOOTER_TAIL - length)
        return hashlib.sha256(handle.read(length) + tail).hexdigest()


def content_hash(files: Iterable[ManifestFile]) -> str:
    """sha256 over the sorted (relative path, size, file sha256): the manifest's identity of the data."""
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda f: f.path):
        digest.update(f"{entry.path}\0{entry.size}\0{entry.sha256}\n".encode())
    return digest.hexdigest()


def describe_file(root: Path, path: Path) -> ManifestFile:
    relative = path.resolve().relative_to(root).as_posix()
    return ManifestFile(relative, path.stat().st_size, pq.read_metadata(path).num_rows, footer_sha256(path),
                        file_sha256(path))


def write_manifest(manifest: str | Path, root: str | Path, files: Sequence[str | Path]) -> Manifest:
    """Describe `files` (Parquet, under `root`) in the manifest at `manifest`, written atomically."""
    folder = Path(root).resolve()
    entries = []
    for file in files:
        path = Path(file).resolve()
        if not path.is_relative_to(folder):
            raise ConfigError(f"{path} is not under the manifest's root {folder}")
        entries.append(describe_file(folder, path))
    entries.sort(key=lambda f: f.path)
    described = Manifest(str(folder), tuple(entries), sum(f.rows for f in entries), content_hash(entries))
    write_json(manifest, {"format": FORMAT, "root": described.root, "rows": described.rows,
                          "sha256": described.sha256, "files": [asdict(f) for f in entries]})
    return described


def _field(path: Path, raw: dict[str, Any], name: str, kind: type, where: str = "") -> Any:
    value = raw.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError(path, f"manifest field '{where}{name}' is missing or not a {kind.__name__}",
                         column=f"{where}{name}", expected=f"a {kind.__name__}", found=value)
    return value


def read_manifest(manifest: str | Path) -> Manifest:
    """The manifest at `manifest`, checked for its format and fields (not yet against the data: verify)."""
    path = Path(manifest)
    if not path.is_file():
        raise InputError(path, "manifest does not exist", expected="the output of the stage that writes it")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(path, f"not JSON: {error}", expected=f"a manifest ({FORMAT})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise InputError(path, "not a uservalue manifest", column="format", expected=FORMAT,
                         found=raw.get("format") if isinstance(raw, dict) else type(raw).__name__)
    entries = []
    for index, item in enumerate(_field(path, raw, "files", list)):
        where = f"files[{index}]."
        if not isinstance(item, dict):
            raise InputError(path, f"manifest entry files[{index}] is not an object", column=f"files[{index}]",
                             expected="{path, size, rows, footer_sha256, sha256}", found=item)
        entries.append(ManifestFile(_field(path, item, "path", str, where), _field(path, item, "size", int, where),
                                    _field(path, item, "rows", int, where),
                                    _field(path, item, "footer_sha256", str, where),
                                    _field(path, item, "sha256", str, where)))
    described = Manifest(_field(path, raw, "root", str), tuple(entries), _field(path, raw, "rows", int),
                         _field(path, raw, "sha256", str))
    if described.sha256 != content_hash(entries) or described.rows != sum(f.rows for f in entries):
        raise InputError(path, "the manifest's sha256 or rows do not match its files (edited by hand?)",
                         column="sha256", expected=content_hash(entries), found=described.sha256)
    return described


def verify(manifest: Manifest, source: str | Path = "manifest", *, content: bool = False) -> None:
    """The data still is what `manifest` describes: every file present with its size and Parquet footer
    (and, `content`, its bytes' sha256). Raise InputError naming the first file that differs."""
    for entry, path in zip(manifest.files, manifest.locations(), strict=True):
        rerun = f"the data described by {source}: rerun the stage that writes it (dvc repro -f <stage>)"
        if not path.is_file():
            raise InputError(path, "file listed in the manifest does not exist", expected=rerun)
        size = path.stat().st_size
        if size != entry.size:
            raise InputError(path, "changed since the manifest was written", column="size",
                             expected=f"{entry.size} bytes ({rerun})", found=size)
        if footer_sha256(path) != entry.footer_sha256:
            raise InputError(path, "changed since the manifest was written", column="footer_sha256",
                             expected=rerun)
        if content and file_sha256(path) != entry.sha256:
            raise InputError(path, "changed since the manifest was written", column="sha256", expected=rerun)


def resolve_input(path: str | Path, *, content: bool = False) -> Path:
    """A stage's input: `path` itself, or, when it names a manifest, the verified Parquet file it lists."""
    if not is_manifest(path):
        return Path(path)
    described = read_manifest(path)
    verify(described, path, content=content)
    return described.location()


def finish_output(out: str | Path, written: Path) -> Manifest | None:
    """After a stage wrote `written` for its output `out`: the manifest, when `out` names one."""
    if not is_manifest(out):
        return None
    return write_manifest(out, written.parent, [written])


__all__ = ["FORMAT", "SUFFIX", "Manifest", "ManifestFile", "content_hash", "external_root", "external_target",
           "file_sha256", "finish_output", "footer_sha256", "is_manifest", "read_manifest", "resolve_input",
           "verify", "write_manifest"]
