"""DVC stage `ingest`: raw source (params `data`) -> data/events.parquet and data/truth/.

Thin on purpose: the stage is the `uservalue ingest` command, so DVC and people run the same code.
"""

import sys

from uservalue.cli import app

if __name__ == "__main__":
    app(["ingest", *sys.argv[1:]], prog_name="pipelines/ingest.py")
