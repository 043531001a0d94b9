"""A user's plain clone has nothing beside it: no test or project file may need a path outside the
repository, and without the real Taobao sample only the real-sample tests skip, saying why."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.samples import SAMPLE_DIR_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
# The only files allowed to look beside the checkout: they set SAMPLE_DIR_ENV when ../shared/data exists.
SAMPLE_LOCATORS = {"Makefile", ".ci/run"}
PARENTS = re.compile(r"Path\(__file__\)\.resolve\(\)\.parents\[(\d+)\]")
OUTSIDE = re.compile(r"\.\./shared|/work/|\.\./\.\.")


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True)
    return [name for name in listed.stdout.splitlines() if (REPO_ROOT / name).is_file()]


def source_files() -> list[str]:
    return [name for name in tracked_files()
            if name.endswith((".py", ".yaml", ".toml", ".cfg", ".sh")) or name in SAMPLE_LOCATORS]


def test_no_project_file_resolves_a_path_outside_the_repository() -> None:
    outside: list[str] = []
    for name in source_files():
        text = (REPO_ROOT / name).read_text(errors="replace")
        depth = len(Path(name).parts) - 1  # parents[depth] of this file is the repository root
        for match in PARENTS.finditer(text):
            if int(match.group(1)) > depth:
                outside.append(f"{name}: {match.group(0)} is above the repository root")
        if name not in SAMPLE_LOCATORS and name != "tests/code/test_plain_clone.py":
            outside += [f"{name}: {m.group(0)!r}" for m in OUTSIDE.finditer(text)]
    assert not outside, "paths outside the repository:\n" + "\n".join(outside)


@pytest.mark.slow
def test_a_clone_without_the_sample_collects_and_runs_the_sample_tests(tmp_path: Path) -> None:
    clone = tmp_path / "nothing-beside" / "uservalue"
    for name in tracked_files():
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, clone / name)
    env = {k: v for k, v in os.environ.items() if k != SAMPLE_DIR_ENV}

    def pytest_in_clone(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=clone,
                              env=env, capture_output=True, text=True, timeout=600)

    sample_tests = ["tests/data/test_bad_input.py", "tests/data/test_sources.py", "tests/data/test_validation.py"]
    others = sorted(name for name in (path.relative_to(clone).as_posix() for path in (clone / "tests").rglob("test_*.py"))
                    if name not in sample_tests)
    # One pytest run: it collects the whole suite (an import error anywhere fails it) and runs the sample
    # files' fast tests, every other file deselected after collection.
    ran = pytest_in_clone("-m", "not slow", "-q", "-rs", "tests", *(f"--deselect={name}" for name in others))
    assert ran.returncode == 0, ran.stdout[-5000:] + ran.stderr[-3000:]
    summary = ran.stdout.splitlines()[-1]
    assert "error" not in summary, ran.stdout[-3000:]
    assert re.search(r"\d+ deselected", summary), summary  # the rest of the suite was collected
    assert re.search(r"\d+ passed", summary) and re.search(r"\d+ skipped", summary), summary
    skipped = [line for line in ran.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped and all(f"{SAMPLE_DIR_ENV} is not set" in line for line in skipped), "\n".join(skipped)
