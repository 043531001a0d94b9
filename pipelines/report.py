"""DVC stage `report`: the outcome of the run on one static page -> reports/index.html."""

import sys

from uservalue.cli.common import run_one
from uservalue.cli.reports import report

if __name__ == "__main__":  # the `uservalue report` command, so DVC and a person run the same code
    run_one(report, sys.argv[1:], prog_name="pipelines/report.py")
