"""Outputs outside the workspace (issue 14, the manifest pattern; uservalue.data.manifest): the library on a
tiny Parquet file, and real DVC in a temporary git repository whose ingest and validate write their Parquet
under data.external_root (a folder outside the repository) and whose DVC outputs are the manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.e2e.conftest import run_in
from uservalue.data.manifest import (
    external_target,
    read_manifest,
    resolve_input,
    verify,
    write_manifest,
)
from uservalue.errors import ConfigError, InputError


def _parquet(path: Path, values: list[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": [str(v) for v in values], "amount": [float(v) for v in values]}), path)
    return path


def test_manifest_describes_the_data_and_changes_with_it(tmp_path: Path) -> None:
    root = tmp_path / "external"
    target = external_target(tmp_path / "ws" / "events.manifest.json", str(root))
    assert target == root.resolve() / "events.parquet"
    _parquet(target, [1, 2, 3])
    first = write_manifest(tmp_path / "ws" / "events.manifest.json", root, [target])
    assert (first.rows, [f.path for f in first.files]) == (3, ["events.parquet"])
    assert read_manifest(tmp_path / "ws" / "events.manifest.json") == first
    assert resolve_input(tmp_path / "ws" / "events.manifest.json", content=True) == target
    assert resolve_input(tmp_path / "plain.parquet") == tmp_path / "plain.parquet"  # not a manifest: as given

    _parquet(target, [1, 2, 3])  # the same data rewritten: the same manifest
    assert write_manifest(tmp_path / "again.manifest.json", root, [target]).sha256 == first.sha256
    _parquet(target, [1, 2, 4])  # other data behind the manifest's back: named, not read silently
    with pytest.raises(InputError, match=r"events\.parquet.*changed since the manifest was written"):
        verify(first, "events.manifest.json", content=True)
    assert write_manifest(tmp_path / "new.manifest.json", root, [target]).sha256 != first.sha256
    target.unlink()
    with pytest.raises(InputError, match="does not exist"):
        resolve_input(tmp_path / "ws" / "events.manifest.json")


def test_bad_manifests_and_settings_are_named(tmp_path: Path) -> None:
    manifest = tmp_path / "events.manifest.json"
    manifest.write_text(json.dumps({"format": "uservalue.parquet-manifest/1", "root": "/x", "rows": 1,
                                    "sha256": "0", "files": [{"path": "a.parquet", "size": "12"}]}))
    with pytest.raises(InputError, match=r"events\.manifest\.json, column 'files\[0\]\.size'"):
        read_manifest(manifest)
    manifest.write_text("{}")
    with pytest.raises(InputError, match="not a uservalue manifest"):
        read_manifest(manifest)
    with pytest.raises(ConfigError, match="set data.external_root"):
        external_target(manifest, None)
    with pytest.raises(ConfigError, match="local or mounted folder"):
        external_target(manifest, "s3a://bucket/uservalue")


# --- real DVC -----------------------------------------------------------------------------------------------

USERS, PER_USER = 120, 3  # >= validate.min_users / min_purchases (100)


def _write_log(path: Path, extra_amount: float = 0.0) -> None:
    """A small order export (one purchase a month per user, 1997) in the `file` source's columns."""
    lines = ["user_id,ts,behavior,item_id,category_id,quantity,amount"]
    for user in range(USERS):
        for k in range(PER_USER):
            amount = 10.0 + user % 7 + k + (extra_amount if user == 0 and k == 0 else 0.0)
            lines.append(f"u{user},1997-{1 + 3 * k + user % 3:02d}-{1 + user % 27:02d}T12:00:00,buy,"
                         f"i{user % 11},c{user % 5},1,{amount}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


DVC_YAML = """
stages:
  ingest:
    cmd: uservalue ingest --params params.yaml --out data/events.manifest.json --truth-dir data/truth
      --rejects data/rejects.csv
    deps: [data/raw/log.csv]
    params: [data]
    outs:
      - data/events.manifest.json: {cache: false}
      - data/truth
      - data/rejects.csv
  validate:
    cmd: uservalue validate --params params.yaml --events data/events.manifest.json
      --out data/validated.manifest.json --quarantine data/quarantine.manifest.json --report-dir reports/validation
    deps: [data/events.manifest.json]
    params: [validate, data.behaviors, data.source, data.external_root]
    outs:
      - data/validated.manifest.json: {cache: false}
      - data/quarantine.manifest.json: {cache: false}
      - reports/validation: {cache: false}
  featurize:
    cmd: uservalue featurize --params params.yaml --events data/validated.manifest.json --out-dir data/features
    deps: [data/validated.manifest.json]
    params: [featurize, split]
    outs: [data/features]
"""


@pytest.fixture(scope="module")
def manifest_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A git + DVC repository with the three data stages on manifests, and its external root (outside it)."""
    base = tmp_path_factory.mktemp("manifest")
    repo, external = base / "repo", base / "external"
    repo.mkdir()
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"].update({"source": "file", "path": "data/raw/log.csv", "external_root": str(external),
                           "event_log": None})
    params["featurize"]["threads"] = 1
    params["split"] = {"eval_cutoff": "1997-07-01", "horizon_days": 120, "train_cutoffs": ["1997-04-01"]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "dvc.yaml").write_text(DVC_YAML)
    _write_log(repo / "data/raw/log.csv")
    run_in(repo, "git", "init", "-q")
    run_in(repo, "dvc", "init", "-q")
    run_in(repo, "git", "add", "-A")
    run_in(repo, "git", "commit", "-qm", "project")
    return repo, external


def _ran(output: str) -> set[str]:
    return {stage for stage in ("ingest", "validate", "featurize") if f"Running stage '{stage}'" in output}


@pytest.mark.slow
def test_dvc_tracks_external_data_through_its_manifest(manifest_repo: tuple[Path, Path]) -> None:
    repo, external = manifest_repo
    assert _ran(run_in(repo, "dvc", "repro").stdout) == {"ingest", "validate", "featurize"}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    outs = [o["path"] for o in lock["ingest"]["outs"]]
    assert sorted(outs) == ["data/events.manifest.json", "data/rejects.csv", "data/truth"]  # the manifest is the out
    events = read_manifest(repo / "data/events.manifest.json")
    assert events.rows == USERS * PER_USER == pq.read_metadata(external / "events.parquet").num_rows
    assert events.locations() == [external.resolve() / "events.parquet"]
    assert not (repo / "data/events.parquet").exists()  # the data itself stays outside the workspace
    validated = read_manifest(repo / "data/validated.manifest.json")
    assert validated.rows == events.rows and validated.locations() == [external.resolve() / "validated.parquet"]
    assert pq.read_metadata(repo / "data/features/eval.parquet").num_rows == USERS

    # Nothing changed: nothing runs.
    assert _ran(run_in(repo, "dvc", "repro").stdout) == set()
    # ingest rerun on the same source: identical data, an identical manifest, the stages after it stay cached.
    assert _ran(run_in(repo, "dvc", "repro", "-f", "-s", "ingest").stdout) == {"ingest"}
    assert read_manifest(repo / "data/events.manifest.json") == events
    assert "up to date" in run_in(repo, "dvc", "status").stdout.lower()

    # Other data (one amount changed at the source): a new content hash, and the stage reading it is stale.
    _write_log(repo / "data/raw/log.csv", extra_amount=5.0)
    assert _ran(run_in(repo, "dvc", "repro", "-s", "ingest").stdout) == {"ingest"}
    changed = read_manifest(repo / "data/events.manifest.json")
    assert changed.rows == events.rows and changed.sha256 != events.sha256
    status = run_in(repo, "dvc", "status", "--json").stdout
    assert json.loads(status) == {"validate": [{"changed deps": {"data/events.manifest.json": "modified"}}]}

    # Data changed behind the manifest's back (DVC cannot see it): the stage reading it names the file.
    pq.write_table(pq.read_table(external / "validated.parquet").slice(1), external / "validated.parquet")
    failed = run_in(repo, "uservalue", "featurize", "--params", "params.yaml", "--events",
                    "data/validated.manifest.json", "--out-dir", "data/features", check=False)
    assert failed.returncode != 0
    assert "validated.parquet" in failed.stderr and "changed since the manifest was written" in failed.stderr
