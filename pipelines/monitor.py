"""DVC stage `monitor`: Evidently drift of the champion's current predictions against its evaluation-time
reference -> reports/monitoring/{<date>.html, latest.json}, also logged to MLflow.
"""

import sys

from uservalue.cli.common import run_one
from uservalue.cli.lifecycle import monitor

if __name__ == "__main__":  # the `uservalue monitor` command, so DVC and a person run the same code
    run_one(monitor, sys.argv[1:], prog_name="pipelines/monitor.py")
