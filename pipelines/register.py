"""DVC stage `register`: the evaluation champion into the MLflow registry, promoted only through the gate
(params `register`) -> reports/registry.json.
"""

import sys

from uservalue.cli.common import run_one
from uservalue.cli.lifecycle import register

if __name__ == "__main__":  # the `uservalue register` command, so DVC and a person run the same code
    run_one(register, sys.argv[1:], prog_name="pipelines/register.py")
