"""DVC stage `evaluate`: every model on the evaluation cutoff -> reports/metrics.json, plots, comparison table.

Thin on purpose: the stage is the `uservalue evaluate` command, so DVC and people run the same code.
"""

import sys

from uservalue.cli import app

if __name__ == "__main__":
    app(["evaluate", *sys.argv[1:]], prog_name="pipelines/evaluate.py")
