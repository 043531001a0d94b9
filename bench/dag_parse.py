"""Parse time of each DAG file in dags/, as Airflow's DagBag measures it (the scheduler re-parses them often).

    .venv/bin/python bench/dag_parse.py [--repeat 5]

Each repeat builds a fresh DagBag in a fresh interpreter (nothing cached between repeats) and
reads DagBag.dagbag_stats; prints the median and max per file and writes bench/out/dag_parse.json.
Target (issue 5): under one second per file. Nothing is asserted.
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
ONE_PARSE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
print(json.dumps({s.file: s.duration.total_seconds() for s in bag.dagbag_stats}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "AIRFLOW_HOME": home, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags")}
        for _ in range(args.repeat):
            done = subprocess.run([sys.executable, "-c", ONE_PARSE, str(ROOT / "dags")], env=env, check=True,
                                  capture_output=True, text=True)
            for file, value in json.loads(done.stdout.strip().splitlines()[-1]).items():
                seconds.setdefault(file, []).append(value)
    result = {file: {"median_s": statistics.median(v), "max_s": max(v), "runs": len(v)} for file, v in seconds.items()}
    for file, row in result.items():
        print(f"{file:<28} median {row['median_s'] * 1000:7.1f} ms   max {row['max_s'] * 1000:7.1f} ms   "
              f"({row['runs']} fresh parses)")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "dag_parse.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
