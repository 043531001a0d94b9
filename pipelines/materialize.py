"""DVC stage `materialize`: every user's validated events into the online store (params `serve.store`:
SQLite or Redis), switched in atomically -> reports/materialize.json.
"""

import sys

from uservalue.cli.common import run_one
from uservalue.cli.online import materialize

if __name__ == "__main__":  # the `uservalue materialize` command, so DVC and a person run the same code
    run_one(materialize, sys.argv[1:], prog_name="pipelines/materialize.py")
