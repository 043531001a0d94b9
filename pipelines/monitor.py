"""DVC stage `monitor`: Evidently drift of the champion's current predictions against its evaluation-time
reference -> reports/monitoring/{<date>.html, latest.json}, also logged to MLflow.

Thin on purpose: the stage is the `uservalue monitor` command, so DVC and people run the same code.
"""

import sys

from uservalue.cli import app

if __name__ == "__main__":
    app(["monitor", *sys.argv[1:]], prog_name="pipelines/monitor.py")
