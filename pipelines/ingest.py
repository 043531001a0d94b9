"""DVC stage `ingest`: raw source (params `data`) -> data/events.parquet and data/truth/.
"""

import sys

from uservalue.cli.common import run_one
from uservalue.cli.data import ingest

if __name__ == "__main__":  # the `uservalue ingest` command, so DVC and a person run the same code
    run_one(ingest, sys.argv[1:], prog_name="pipelines/ingest.py")
