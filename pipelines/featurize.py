"""DVC stage `featurize`: features and labels at the cutoffs (params `featurize`, `split`) -> data/features/.
"""

import sys

from uservalue.cli.common import run_one
from uservalue.cli.data import featurize

if __name__ == "__main__":  # the `uservalue featurize` command, so DVC and a person run the same code
    run_one(featurize, sys.argv[1:], prog_name="pipelines/featurize.py")
