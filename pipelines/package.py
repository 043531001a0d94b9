"""DVC stage `package`: the registered champion into the BentoML store, then `bentoml build` -> reports/package.json.

Thin on purpose: the stage is the `uservalue package` command, so DVC and people run the same code.
"""

import sys

from uservalue.cli import app

if __name__ == "__main__":
    app(["package", *sys.argv[1:]], prog_name="pipelines/package.py")
