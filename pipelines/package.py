"""DVC stage `package`: the registered champion into the BentoML store, then `bentoml build` -> reports/package.json.
"""

import sys

from uservalue.cli.common import run_one
from uservalue.cli.lifecycle import package

if __name__ == "__main__":  # the `uservalue package` command, so DVC and a person run the same code
    run_one(package, sys.argv[1:], prog_name="pipelines/package.py")
