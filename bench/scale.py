"""How each pipeline stage's cost grows with the log: wall time, peak RSS, events/s, log-log slope.

    python bench/scale.py                                       # 1e6 1e7 1e8 events, the data stages
    python bench/scale.py --events 1e6 1e7 --stages ingest validate embed_items featurize materialize
    python bench/scale.py --events 1e8 --stages ingest validate embed_items featurize --threads 2
    python bench/scale.py --events 1e6 --stages ingest validate embed_items featurize train@linear evaluate
    python bench/scale.py --events 1e8 --project /tmp/scale-1e8 --set train.sequence.max_train_rows=300000 \\
        --models historical btyd gbdt linear mlp sequence --stages train@sequence evaluate   # reuses its data

Per size, a temporary project (the repo's params.yaml, pipelines/ and what `package` builds from; `--project
DIR` keeps it, or reuses one with its data) is built and each
stage runs its DVC command (dvc.yaml's `cmd`, `train@<model>` expanded from the foreach) in a child
process, so the figures are those of `dvc repro`. The log is the synthetic source at ~100 events per
user (`data.synthetic.users = events / 100`); `--source taobao` writes that log as a Taobao CSV first
(not timed) and ingests it through the `taobao` source. Peak RSS is the most the stage's process tree
held at once (psutil, polled every 0.1 s, children included). Figures are printed and written to
bench/out/scale.json, never asserted; the targets (issue 13) are <= 8 GiB per stage at 1e8 events,
ingest + validate + featurize <= 15 min together, and a slope of time against events <= 1.1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
EVENTS_PER_USER = 100.0  # non-purchase events; purchases add ~2 per user
DATA_STAGES = ("ingest", "validate", "embed_items", "featurize", "materialize")  # embed_items: featurize reads it
# What the package stage reads beside params and pipelines/: the Bento's files and the library it builds a wheel of.
PACKAGE_INPUTS = ("service.py", "bentofile.yaml", "pyproject.toml", "README.md", "src")


@dataclass(frozen=True)
class Figure:
    stage: str
    target_events: int
    events: int
    wall_s: float
    peak_rss_gib: float
    events_per_s: float
    exit_code: int
    load_avg: float | None = None  # 1-minute load average when the stage ended (the machine is shared)
    params: str | None = None  # the --set overrides the run used


def stage_commands(models: list[str]) -> dict[str, str]:
    """Every stage's command from dvc.yaml (train's foreach expanded per model)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    commands: dict[str, str] = {}
    for name, spec in stages.items():
        if "foreach" in spec:
            for model in models:
                commands[f"{name}@{model}"] = spec["do"]["cmd"].replace("${item}", model)
        else:
            commands[name] = spec["cmd"]
    return commands


def set_dotted(raw: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        raw = raw.setdefault(part, {})
    raw[leaf] = value


def copy_code(root: Path) -> None:
    """pipelines/ and the package stage's inputs (PACKAGE_INPUTS), fresh from the repository."""
    for name in ("pipelines", *PACKAGE_INPUTS):
        source, target = REPO / name, root / name
        if target.is_dir():
            shutil.rmtree(target)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif source.is_file():
            shutil.copy2(source, target)


def make_project(root: Path, events: int, args: argparse.Namespace) -> None:
    """A project folder holding what the stage commands read: params.yaml, pipelines/ and PACKAGE_INPUTS."""
    copy_code(root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    users = max(round(events / 100), 100)  # ~100 events per user, as the issue sizes it
    overrides = {
        "data.source": "synthetic",
        "data.event_log": None,
        "data.synthetic.users": users,
        "data.synthetic.events_per_user": EVENTS_PER_USER,
        "duckdb.threads": args.threads,
        "duckdb.memory_limit": args.duckdb_memory,
        "featurize.threads": args.threads,
        "materialize.threads": args.threads,
        "train.models": args.models,
    }
    for dotted, value in overrides.items():
        set_dotted(params, dotted, value)
    for dotted, value in parse_sets(args.set).items():
        set_dotted(params, dotted, value)
    if args.source == "taobao":
        csv = root / "data" / "raw" / "UserBehavior.csv"
        write_taobao_csv(params["data"]["synthetic"], csv)
        set_dotted(params, "data.source", "taobao")
        set_dotted(params, "data.path", str(csv))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def parse_sets(items: list[str]) -> dict[str, object]:
    """`--set train.sequence.max_train_rows=2000000` -> {dotted key: YAML-parsed value}."""
    parsed: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. train.sequence.max_train_rows=2000000")
        parsed[key] = yaml.safe_load(value)
    return parsed


def reuse_project(project: Path, args: argparse.Namespace) -> None:
    """A kept project from an earlier run: refresh pipelines/ and apply --set/--models, keep its data."""
    if not (project / "params.yaml").is_file():
        raise SystemExit(f"--project {project}: no params.yaml there (run once with --project on a new folder)")
    copy_code(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    set_dotted(params, "train.models", args.models)
    for dotted, value in parse_sets(args.set).items():
        set_dotted(params, dotted, value)
    tmp = project / f"params.yaml.{os.getpid()}.tmp"  # atomic: a stage of another run may be reading it
    tmp.write_text(yaml.safe_dump(params, sort_keys=False))
    tmp.replace(project / "params.yaml")


def write_taobao_csv(synthetic: dict, csv: Path) -> None:
    """The synthetic log in the Taobao format (setup, not timed)."""
    from uservalue.config import SyntheticSource
    from uservalue.data.sources.synthetic import generate
    from uservalue.data.sources.taobao import export_taobao_csv

    csv.parent.mkdir(parents=True)
    generated = csv.parent / "generated.parquet"
    generate(SyntheticSource.model_validate(synthetic), generated, csv.parent / "truth")
    export_taobao_csv(generated, csv)
    generated.unlink()
    shutil.rmtree(csv.parent / "truth")


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:  # a child that ended between listing and reading
            pass
    return total


def run_stage(command: str, cwd: Path, env: dict[str, str], log: Path) -> tuple[float, int, int]:
    """Run one stage command; (wall seconds, peak RSS bytes of its process tree, exit code)."""
    peak = 0
    started = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(command, shell=True, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        watched = psutil.Process(child.pid)
        done = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not done.is_set():
                try:
                    peak = max(peak, tree_rss(watched))
                except psutil.Error:
                    return
                done.wait(0.1)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        code = child.wait()
        done.set()
        poller.join()
    return time.perf_counter() - started, peak, code


def event_count(project: Path) -> int:
    import pyarrow.parquet as pq

    path = project / "data" / "events.parquet"
    return pq.read_metadata(path).num_rows if path.is_file() else 0


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Until the CLI hands params `duckdb` to uservalue.duck, the environment carries the same settings.
    env["USERVALUE_DUCKDB_MEMORY_LIMIT"] = args.duckdb_memory
    if args.threads:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "USERVALUE_DUCKDB_THREADS"):
            env[name] = str(args.threads)
    env.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    return env


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(time) against log(events)."""
    points = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    parser.add_argument("--stages", nargs="+", default=list(DATA_STAGES),
                        help="stage names as in dvc.yaml (train@<model> for one model)")
    parser.add_argument("--models", nargs="+", default=["linear"], help="train.models in the temporary project")
    parser.add_argument("--source", choices=["synthetic", "taobao"], default="synthetic")
    parser.add_argument("--threads", type=int, default=0, help="DuckDB and BLAS threads (0: all cores)")
    parser.add_argument("--duckdb-memory", default="4GB", help="params duckdb.memory_limit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects (their paths are printed)")
    parser.add_argument("--project", type=Path,
                        help="project folder (one --events size): created when absent, else reused with its data, "
                             "so the stages after a failure can run again without the data stages (implies --keep)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml override in the project, e.g. train.sequence.max_train_rows=2000000")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "scale.json")
    parser.add_argument("--append", action="store_true",
                        help="keep the figures already in --out (other sizes, earlier runs); a stage and size "
                             "measured again replaces its old figure")
    args = parser.parse_args()
    if args.project is not None:
        if len(args.events) != 1:
            parser.error("--project takes one --events size")
        args.keep = True

    commands = stage_commands(args.models)
    unknown = [s for s in args.stages if s not in commands]
    if unknown:
        parser.error(f"unknown stages {unknown}; known: {sorted(commands)}")
    figures: list[Figure] = []  # this run's; --append merges them into the file's at each write
    env = child_env(args)
    for target in (int(e) for e in args.events):
        if args.project is not None and (args.project / "params.yaml").is_file():
            project = args.project.resolve()
            reuse_project(project, args)
        else:
            if args.project is not None:
                args.project.mkdir(parents=True, exist_ok=True)
            project = (args.project.resolve() if args.project is not None
                       else Path(tempfile.mkdtemp(prefix=f"scale-{target:.0e}-")))
        try:
            if not (project / "params.yaml").is_file():
                make_project(project, target, args)
            for stage in args.stages:
                log = project / f"{stage}.log"
                wall, peak, code = run_stage(commands[stage], project, env, log)
                events = event_count(project)
                figure = Figure(stage, target, events, round(wall, 2), round(peak / 1024**3, 3),
                                round(events / wall) if wall else 0, code, round(os.getloadavg()[0], 2),
                                " ".join(args.set) or None)
                figures = [f for f in figures if (f.stage, f.target_events) != (stage, target)] + [figure]
                print(f"{stage:>14} {events:>13,} events {wall:>9.1f} s {figure.peak_rss_gib:>7.2f} GiB "
                      f"{figure.events_per_s:>12,.0f} ev/s  load {figure.load_avg}" + ("" if code == 0 else f"  EXIT {code}: see {log}"),
                      flush=True)
                written = write_report(args, figures)  # after every stage: a run stopped later keeps these
                if code != 0:
                    print(log.read_text()[-3000:], file=sys.stderr)
                    break
        finally:
            if args.keep:
                print(f"kept {project}")
            else:
                shutil.rmtree(project, ignore_errors=True)
        written = write_report(args, figures)
    print_table(written)


def previous_figures(path: Path) -> list[Figure]:
    if not path.is_file():
        return []
    return [Figure(**f) for f in json.loads(path.read_text())["figures"]]


def slopes(figures: list[Figure]) -> dict[str, float | None]:
    by_stage: dict[str, list[tuple[float, float]]] = {}
    for f in figures:
        if f.exit_code == 0:
            by_stage.setdefault(f.stage, []).append((f.events, f.wall_s))
    return {stage: (None if (s := slope(points)) is None else round(s, 3)) for stage, points in by_stage.items()}


def write_report(args: argparse.Namespace, figures: list[Figure]) -> list[Figure]:
    """Write this run's figures (with --append, over the file's as it is now, so that two runs appending
    to one file, e.g. materialize beside train on a kept project, keep each other's); all written."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.append:
        ours = {(f.stage, f.target_events) for f in figures}
        figures = [f for f in previous_figures(args.out) if (f.stage, f.target_events) not in ours] + figures
    payload = {
        "machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1)},
        "settings": {"source": args.source, "threads": args.threads, "duckdb_memory_limit": args.duckdb_memory},
        "figures": [asdict(f) for f in figures],
        "slopes": slopes(figures),
    }
    tmp = args.out.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(args.out)
    return figures


def print_table(figures: list[Figure]) -> None:
    print("\n| stage | events | wall (s) | peak RSS (GiB) | events/s | load |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for f in sorted(figures, key=lambda f: (f.target_events, f.stage)):
        print(f"| {f.stage} | {f.events:,} | {f.wall_s:,.1f} | {f.peak_rss_gib:.2f} | {f.events_per_s:,} "
              f"| {'' if f.load_avg is None else f.load_avg} |")
    print("\nslope of log(time) against log(events), per stage:")
    for stage, value in slopes(figures).items():
        print(f"  {stage}: {'n/a (one size)' if value is None else value}")


if __name__ == "__main__":
    main()
