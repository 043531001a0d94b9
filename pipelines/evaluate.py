"""DVC stage `evaluate`: every model on the evaluation cutoff -> reports/metrics.json, plots, comparison table.
"""

import sys

from uservalue.cli.common import run_one
from uservalue.cli.lifecycle import evaluate

if __name__ == "__main__":  # the `uservalue evaluate` command, so DVC and a person run the same code
    run_one(evaluate, sys.argv[1:], prog_name="pipelines/evaluate.py")
