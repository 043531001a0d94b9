"""The pipeline on CDNOW with engine duckdb and with engine spark, end to end (issue 14, done-when).

    .venv/bin/python bench/engine_pipeline.py [--models linear gbdt] [--master local[2]] [--keep]
    .venv/bin/python bench/engine_pipeline.py --resume DUCKDB_PROJECT SPARK_PROJECT --from featurize

Two temporary projects (the repo's params.yaml and pipelines/, nothing else, as bench/scale.py builds them)
run the DVC commands of dvc.yaml (`train@<model>` expanded from its foreach) in child processes, in order:
ingest, validate, embed_items (when dvc.yaml has it), featurize, train@<model> for each --models, evaluate. The first project keeps the
DuckDB defaults; the second sets `data.engine`, `validate.engine` and `featurize.engine` to spark (the
session of params `spark`, `spark.master` = --master). Both read CDNOW (data.source: cdnow) and train
the same models with the same seed.

Then the two projects' outputs are compared:
  events      data/events.parquet                     (equal, column by column, row by row)
  verdicts    reports/validation/summary.json, data/validated.parquet, data/quarantine.parquet
  features    data/features/{train,eval}.parquet      (floats to 1e-9, everything else exactly), meta.json
  split       reports/split.json
  metrics     reports/metrics.json                    (per model and metric: both values and the difference)
and each stage's wall time per engine is printed. The figures go to bench/out/engine_pipeline.json;
nothing is asserted (the parity tests are tests/data/test_spark_parity.py and test_spark_ingest_validate.py).
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
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # bench/scale.py: the same dvc.yaml commands and dotted params

REPO = Path(__file__).resolve().parents[1]
OUT_JSON = REPO / "bench" / "out" / "engine_pipeline.json"
ENGINES = ("duckdb", "spark")
SPARK_SETTINGS = ("data.engine", "validate.engine", "featurize.engine")
FLOAT_TOLERANCE = 1e-9


def stage_commands(models: list[str]) -> list[tuple[str, str]]:
    """(stage, command) in pipeline order, from dvc.yaml (train's foreach expanded per model)."""
    commands = scale.stage_commands(models)
    text = ["embed_items"] if "embed_items" in commands else []  # issue 23: featurize joins its vectors (none on CDNOW)
    order = ["ingest", "validate", *text, "featurize", *[f"train@{m}" for m in models], "evaluate"]
    return [(stage, commands[stage]) for stage in order]


def make_project(root: Path, engine: str, models: list[str], master: str) -> None:
    shutil.copytree(REPO / "pipelines", root / "pipelines", dirs_exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    overrides: dict[str, object] = {"data.source": "cdnow", "data.event_log": None, "train.models": models,
                                    "spark.master": master}
    for dotted in SPARK_SETTINGS:
        overrides[dotted] = engine
    for dotted, value in overrides.items():
        scale.set_dotted(params, dotted, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for leaked in ("MLFLOW_TRACKING_URI", "BENTOML_HOME", "SPARK_MASTER"):
        env.pop(leaked, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = "sqlite:///mlflow.db"  # each project's own store
    return env


def run_pipeline(project: Path, commands: list[tuple[str, str]], first: str | None = None) -> dict[str, float]:
    """Run the stages in order (from `first`: the earlier ones' walls come from the project's walls.json)."""
    record = project / "walls.json"
    walls: dict[str, float] = json.loads(record.read_text()) if first and record.is_file() else {}
    names = [stage for stage, _ in commands]
    env = child_env()
    for stage, command in commands[names.index(first) if first else 0:]:
        log = project / f"{stage}.log"
        started = time.perf_counter()
        with log.open("w") as out:
            code = subprocess.run(command, shell=True, cwd=project, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, check=False).returncode
        walls[stage] = round(time.perf_counter() - started, 2)
        print(f"  {project.name:<24} {stage:<14} {walls[stage]:>8.1f} s" + ("" if code == 0 else f"  EXIT {code}"),
              flush=True)
        record.write_text(json.dumps(walls))
        if code != 0:
            print(log.read_text()[-4000:], file=sys.stderr)
            raise SystemExit(f"{stage} failed in {project} (log: {log})")
    return {stage: walls[stage] for stage in names if stage in walls}


def compare_tables(left: Path, right: Path) -> dict[str, Any]:
    """Column by column: floats (and lists of floats) to FLOAT_TOLERANCE, everything else exactly."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    a, b = pq.read_table(left), pq.read_table(right)
    result: dict[str, Any] = {"rows": [a.num_rows, b.num_rows], "columns_only_in": {}, "differing_columns": {}}
    names_a, names_b = set(a.column_names), set(b.column_names)
    if names_a != names_b:
        result["columns_only_in"] = {"duckdb": sorted(names_a - names_b), "spark": sorted(names_b - names_a)}
    if a.num_rows != b.num_rows:
        result["equal"] = False
        return result
    for name in [n for n in a.column_names if n in names_b]:
        x, y = a.column(name).combine_chunks(), b.column(name).combine_chunks()
        kind = x.type.value_type if pa.types.is_list(x.type) or pa.types.is_large_list(x.type) else x.type
        if pa.types.is_floating(kind):
            if pa.types.is_list(x.type) or pa.types.is_large_list(x.type):
                if x.value_lengths().to_pylist() != y.value_lengths().to_pylist() or \
                        x.is_null().to_pylist() != y.is_null().to_pylist():
                    result["differing_columns"][name] = "list lengths or nulls differ"
                    continue
                x, y = x.flatten(), y.flatten()
            xs = x.to_numpy(zero_copy_only=False).astype(float)
            ys = y.to_numpy(zero_copy_only=False).astype(float)
            same_nan = np.isnan(xs) == np.isnan(ys)
            gap = np.abs(np.nan_to_num(xs) - np.nan_to_num(ys))
            worst = float(gap.max()) if gap.size else 0.0
            if not same_nan.all() or worst > FLOAT_TOLERANCE:
                result["differing_columns"][name] = {"max_abs_difference": worst,
                                                     "rows": int(((gap > FLOAT_TOLERANCE) | ~same_nan).sum())}
        elif not x.cast(y.type).equals(y) if x.type != y.type else not x.equals(y):
            differ = sum(1 for u, v in zip(x.to_pylist(), y.to_pylist(), strict=True) if u != v)
            result["differing_columns"][name] = {"rows": differ, "types": [str(x.type), str(y.type)]}
    result["equal"] = not result["differing_columns"] and not result["columns_only_in"]
    return result


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def compare_metrics(left: dict, right: dict) -> dict[str, dict[str, dict[str, float]]]:
    table: dict[str, dict[str, dict[str, float]]] = {}
    for model in sorted(set(left.get("models", {})) | set(right.get("models", {}))):
        mine, theirs = left["models"].get(model, {}), right["models"].get(model, {})
        table[model] = {}
        for metric in sorted(set(mine) | set(theirs)):
            x, y = mine.get(metric), theirs.get(metric)
            diff = (y - x) if isinstance(x, (int, float)) and isinstance(y, (int, float)) else math.nan
            table[model][metric] = {"duckdb": x, "spark": y, "difference": diff}
    return table


def compare(projects: dict[str, Path]) -> dict[str, Any]:
    duck, spark = projects["duckdb"], projects["spark"]
    tables = {name: compare_tables(duck / name, spark / name) for name in (
        "data/events.parquet", "data/validated.parquet", "data/quarantine.parquet",
        "data/features/train.parquet", "data/features/eval.parquet")}
    jsons = {}
    for name in ("reports/validation/summary.json", "data/features/meta.json", "reports/split.json",
                 "reports/ingest.json"):
        x, y = read_json(duck / name), read_json(spark / name)
        jsons[name] = {"equal": x == y, **({} if x == y else {"duckdb": x, "spark": y})}
    metrics_d, metrics_s = read_json(duck / "reports/metrics.json"), read_json(spark / "reports/metrics.json")
    other = {key: {"duckdb": metrics_d.get(key), "spark": metrics_s.get(key)}
             for key in sorted(set(metrics_d) | set(metrics_s))
             if key != "models" and metrics_d.get(key) != metrics_s.get(key)}
    return {"tables": tables, "json": jsons, "metrics": compare_metrics(metrics_d, metrics_s),
            "metrics_other_keys_differing": other}


def print_report(report: dict[str, Any]) -> None:
    print("\noutputs (duckdb vs spark):")
    for name, result in report["comparison"]["tables"].items():
        print(f"  {name:<32} rows {result['rows'][0]:>9,} / {result['rows'][1]:>9,}  "
              f"{'equal' if result['equal'] else 'DIFFERENT ' + json.dumps(result['differing_columns'] or result['columns_only_in'])[:400]}")
    for name, result in report["comparison"]["json"].items():
        print(f"  {name:<32} {'equal' if result['equal'] else 'DIFFERENT'}")
    print("\nmetrics (reports/metrics.json): spark - duckdb")
    for model, metrics in report["comparison"]["metrics"].items():
        cells = ", ".join(f"{m} {v['duckdb']:.6g} / {v['spark']:.6g} (diff {v['difference']:+.2e})"
                          for m, v in metrics.items())
        print(f"  {model}: {cells}")
    if report["comparison"]["metrics_other_keys_differing"]:
        print("  other keys differing:", json.dumps(report["comparison"]["metrics_other_keys_differing"]))
    print("\nstage wall time (s):")
    print(f"  {'stage':<14} {'duckdb':>9} {'spark':>9} {'ratio':>7}")
    for stage in report["walls"]["duckdb"]:
        d, s = report["walls"]["duckdb"][stage], report["walls"]["spark"].get(stage, math.nan)
        print(f"  {stage:<14} {d:>9.1f} {s:>9.1f} {s / d if d else math.nan:>7.2f}")
    totals = {e: sum(report["walls"][e].values()) for e in ENGINES}
    print(f"  {'total':<14} {totals['duckdb']:>9.1f} {totals['spark']:>9.1f} "
          f"{totals['spark'] / totals['duckdb']:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["linear", "gbdt"], help="train.models of both projects")
    parser.add_argument("--master", default="local[2]", help="spark.master of the spark project")
    parser.add_argument("--keep", action="store_true", help="keep the two projects (their paths are printed)")
    parser.add_argument("--out", type=Path, default=OUT_JSON)
    parser.add_argument("--resume", type=Path, nargs=2, metavar=("DUCKDB_PROJECT", "SPARK_PROJECT"),
                        help="two projects kept by an earlier run (--keep): refresh their pipelines/ and params, "
                             "rerun from --from (implies --keep)")
    parser.add_argument("--from", dest="first", help="with --resume: the first stage to rerun, e.g. featurize")
    args = parser.parse_args()
    commands = stage_commands(args.models)
    if args.resume and args.first not in [stage for stage, _ in commands]:
        parser.error(f"--resume needs --from, one of {[stage for stage, _ in commands]}")
    args.keep = args.keep or bool(args.resume)
    projects = (dict(zip(ENGINES, (p.resolve() for p in args.resume), strict=True)) if args.resume else
                {engine: Path(tempfile.mkdtemp(prefix=f"engine-pipeline-{engine}-")) for engine in ENGINES})
    for engine, project in projects.items():  # both copies of pipelines/ and params.yaml taken at the same time
        make_project(project, engine, args.models, args.master)
    try:
        walls = {}
        for engine, project in projects.items():
            print(f"{engine}: {project}", flush=True)
            walls[engine] = run_pipeline(project, commands, args.first if args.resume else None)
        report = {"models": args.models, "master": args.master, "walls": walls, "comparison": compare(projects),
                  "load_avg": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    finally:
        if args.keep:
            print("kept", *projects.values())
        else:
            for project in projects.values():
                shutil.rmtree(project, ignore_errors=True)
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\n-> {args.out}")


if __name__ == "__main__":
    main()
