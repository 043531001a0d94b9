"""DVC stage `train_recs`: top-K recommenders fitted before split.eval_cutoff and scored after it (params `recs`),
the best registered as recs.model_name -> models/recs, reports/recs_metrics.json, reports/recs_registry.json.
"""

import sys

from uservalue.cli.common import run_one
from uservalue.cli.recs import train_recs

if __name__ == "__main__":  # the `uservalue train-recs` command, so DVC and a person run the same code
    run_one(train_recs, sys.argv[1:], prog_name="pipelines/train_recs.py")
