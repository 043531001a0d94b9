"""DVC stage `validate`: Great Expectations gate (params `validate`) -> data/validated.parquet, data/quarantine.parquet, reports/validation/.

Thin on purpose: the stage is the `uservalue validate` command, so DVC and people run the same code.
"""

import sys

from uservalue.cli import app

if __name__ == "__main__":
    app(["validate", *sys.argv[1:]], prog_name="pipelines/validate.py")
