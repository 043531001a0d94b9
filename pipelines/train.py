"""DVC stage `train@<model>`: fit one model on the training cutoffs (params `train`) -> models/<model>/,
tracked in MLflow (params `tracking`).

Thin on purpose: the stage is the `uservalue train` command, so DVC and people run the same code.
"""

import sys

from uservalue.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]], prog_name="pipelines/train.py")
