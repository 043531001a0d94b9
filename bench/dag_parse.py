"""Parse time of each DAG file in dags/, as Airflow's DagBag measures it, and what the parse imports.

    .venv/bin/python bench/dag_parse.py [--repeat 5]

Each parse is one file in a fresh interpreter (as the DAG processor parses each file in its own
process): the median and max of DagBag.dagbag_stats per file, and which heavy libraries and
uservalue modules were loaded. Writes bench/out/dag_parse.json. Target (issue 5): under one second
per file. Nothing is asserted (tests/code/test_dag_definition.py checks the imports).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
# What a DAG file must not import at parse time: each costs seconds, and the scheduler parses often.
HEAVY = ("torch", "mlflow", "duckdb", "bentoml", "evidently", "great_expectations", "dvc", "pandas",
         "numpy", "pyarrow", "sklearn", "lightgbm")
ONE_PARSE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
print(json.dumps({"seconds": sum(s.duration.total_seconds() for s in bag.dagbag_stats),
                  "dags": sorted(bag.dags), "modules": sorted(sys.modules)}))
"""


def parse_fresh(dag_file: Path, airflow_home: Path) -> dict:
    """Parse one DAG file with DagBag in a new interpreter: seconds, DAG ids, heavy and uservalue modules loaded."""
    env = {**os.environ, "AIRFLOW_HOME": str(airflow_home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(dag_file.parent)}
    done = subprocess.run([sys.executable, "-c", ONE_PARSE, str(dag_file)], env=env, check=False,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"parsing {dag_file} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    modules = report.pop("modules")
    report["heavy"] = [name for name in HEAVY if name in modules]
    report["uservalue"] = [name for name in modules if name.split(".")[0] == "uservalue"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as home:
        for dag_file in sorted((ROOT / "dags").glob("*.py")):
            reports = [parse_fresh(dag_file, Path(home)) for _ in range(args.repeat)]
            seconds = [report["seconds"] for report in reports]
            result[dag_file.name] = {"median_s": statistics.median(seconds), "max_s": max(seconds),
                                     "runs": len(seconds), "heavy_modules": reports[-1]["heavy"],
                                     "uservalue_modules": reports[-1]["uservalue"]}
    for file, row in result.items():
        print(f"{file:<24} median {row['median_s'] * 1000:6.1f} ms   max {row['max_s'] * 1000:6.1f} ms   "
              f"({row['runs']} fresh parses)   heavy modules: {', '.join(row['heavy_modules']) or 'none'}; "
              f"uservalue: {', '.join(row['uservalue_modules'])}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "dag_parse.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
