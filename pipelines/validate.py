"""DVC stage `validate`: Great Expectations gate (params `validate`) -> data/validated.parquet, data/quarantine.parquet, reports/validation/.
"""

import sys

from uservalue.cli.common import run_one
from uservalue.cli.data import validate

if __name__ == "__main__":  # the `uservalue validate` command, so DVC and a person run the same code
    run_one(validate, sys.argv[1:], prog_name="pipelines/validate.py")
