"""DVC re-runs a stage when the code it runs changes: every project module a stage can execute is
covered by that stage's `deps` in dvc.yaml.

For each stage, a fresh interpreter imports the stage's entry script (as a module, not run) and
then, until nothing new appears, every `uservalue` module named by an import statement in the
project modules loaded so far, including imports inside functions (they run when the command
runs), except inside the other commands of a CLI module (the stage runs one command), and, for
train@<model>, the model's catalog module. What it loaded from this repository must lie under one
of the stage's deps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tests.conftest import REPO_ROOT
from uservalue.config import MODEL_CATALOG

PROBE = r"""
import ast, importlib, importlib.util, json, sys
from pathlib import Path

root = Path(sys.argv[1]).resolve()
entry, command, extra = sys.argv[2], sys.argv[3], sys.argv[4:]
spec = importlib.util.spec_from_file_location("stage_entry", root / entry)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
for name in extra:
    importlib.import_module(name)


def project_files():
    files = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and Path(path).is_absolute() and Path(path).resolve().is_relative_to(root) and ".venv" not in Path(path).parts:
            files[name] = Path(path).resolve()
    return files


def is_other_command(node):
    decorators = [d.id for d in getattr(node, "decorator_list", []) if isinstance(d, ast.Name)]
    return isinstance(node, ast.FunctionDef) and "reports_errors" in decorators and node.name != command


def walk(node, in_cli):
    yield node
    for child in ast.iter_child_nodes(node):
        if not (in_cli and is_other_command(child)):
            yield from walk(child, in_cli)


def named_imports(path, package):
    in_cli = package == "uservalue.cli"
    for node in walk(ast.parse(path.read_text()), in_cli):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = importlib.util.resolve_name("." * node.level + node.module, package) if node.level else node.module
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def is_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # "package.module.attribute": an attribute, not a module
        return False


seen = set()
while True:
    files = project_files()
    todo = [(name, path) for name, path in files.items() if name not in seen]
    if not todo:
        break
    for name, path in todo:
        seen.add(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for imported in named_imports(path, package):
            if imported.split(".")[0] == "uservalue" and is_module(imported):
                importlib.import_module(imported)
print(json.dumps(sorted(str(p.relative_to(root)) for p in project_files().values())))
"""


def stages() -> dict[str, dict]:
    """dvc.yaml's stages, foreach expanded the way DVC does for train (one per catalog model)."""
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    out = {}
    for name, stage in spec["stages"].items():
        if "foreach" in stage:
            for model in MODEL_CATALOG:
                out[f"{name}@{model}"] = {key: (value.replace("${item}", model) if isinstance(value, str) else value)
                                          for key, value in stage["do"].items()}
        else:
            out[name] = stage
    return out


def probe(stage: str, cmd: str) -> subprocess.CompletedProcess[str]:
    """PROBE in a fresh interpreter for one stage: its entry script, CLI command and catalog module."""
    entry = cmd.split()[1]
    assert entry.startswith("pipelines/"), f"{stage}: the command runs {entry}, not a pipelines/ entry script"
    extra = []
    if "@" in stage:  # the catalog imports the model's module by name
        extra.append(MODEL_CATALOG[stage.split("@")[1]].split(":")[0])
    command = stage.split("@")[0]  # the CLI command the entry script runs (pipelines/<command>.py)
    return subprocess.run([sys.executable, "-c", PROBE, str(REPO_ROOT), entry, command, *extra], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def probed() -> dict[str, subprocess.CompletedProcess[str]]:
    """Every stage's probe, as many at once as there are cores: each is a fresh interpreter that spends
    its seconds importing (one after another they took ~1.5 minutes of the fast suite)."""
    spec = stages()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        runs = {stage: pool.submit(probe, stage, stage_spec["cmd"]) for stage, stage_spec in spec.items()}
        return {stage: run.result() for stage, run in runs.items()}


def loaded_files(probed: dict[str, subprocess.CompletedProcess[str]], stage: str) -> list[str]:
    done = probed[stage]
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(stages()))
def test_stage_deps_cover_every_module_it_runs(stage: str, probed) -> None:
    spec = stages()[stage]
    deps = [dep if isinstance(dep, str) else next(iter(dep)) for dep in spec["deps"]]
    files = loaded_files(probed, stage)
    assert any(f.startswith("src/uservalue/") for f in files), files  # the probe really loaded the library
    missing = [f for f in files if not covered(f, deps)]
    assert not missing, f"dvc.yaml stage {stage}: add to deps {missing}"


def test_materialize_runs_in_a_fresh_clone() -> None:
    """The online store (data/online, or Redis) is materialize's effect, not a DVC output; its one output,
    reports/materialize.json, must not be in git, or a fresh clone whose dvc.lock matches would skip the
    stage (its deps, the validated events and the code, are reproducible) and `make serve` would find no
    stored users. It is ignored (reports/.gitignore) and, in a git checkout, not tracked."""
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in stages()["materialize"]["outs"]]
    assert outs == ["reports/materialize.json"], outs
    assert "/materialize.json" in (REPO_ROOT / "reports/.gitignore").read_text().split()
    if (REPO_ROOT / ".git").exists():  # a copy of the files without git has nothing tracked to check
        tracked = subprocess.run(["git", "ls-files", "--", *outs], cwd=REPO_ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
        assert not tracked, f"materialize's outputs {tracked} are tracked by git: untrack them (git rm --cached)"
