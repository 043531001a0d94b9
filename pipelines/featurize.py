"""DVC stage `featurize`: features and labels at the cutoffs (params `featurize`, `split`) -> data/features/.

Thin on purpose: the stage is the `uservalue featurize` command, so DVC and people run the same code.
"""

import sys

from uservalue.cli import app

if __name__ == "__main__":
    app(["featurize", *sys.argv[1:]], prog_name="pipelines/featurize.py")
