"""DVC stage `train@<model>`: fit one model on the training cutoffs (params `train`) -> models/<model>/,
tracked in MLflow (params `tracking`).
"""

import sys

from uservalue.cli.common import run_one
from uservalue.cli.lifecycle import train

if __name__ == "__main__":  # the `uservalue train` command, so DVC and a person run the same code
    run_one(train, sys.argv[1:], prog_name="pipelines/train.py")
