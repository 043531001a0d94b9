"""DVC stage `register`: the evaluation champion into the MLflow registry, promoted only through the gate
(params `register`) -> reports/registry.json.

Thin on purpose: the stage is the `uservalue register` command, so DVC and people run the same code.
"""

import sys

from uservalue.cli import app

if __name__ == "__main__":
    app(["register", *sys.argv[1:]], prog_name="pipelines/register.py")
