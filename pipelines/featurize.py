"""DVC stage `featurize`: features and labels at the cutoffs (params `featurize`, `split`) -> data/features/,
then the pooled item-text columns when data/item_vectors.parquet has vectors (issue 23; none for a log
without item text: the feature sets stay as the command wrote them).
"""

import sys

from uservalue.cli.common import run_one
from uservalue.cli.data import featurize
from uservalue.text.stage import with_text_join

if __name__ == "__main__":  # the `uservalue featurize` command (+ --item-vectors), so DVC and a person run the same code
    run_one(with_text_join(featurize), sys.argv[1:], prog_name="pipelines/featurize.py")
