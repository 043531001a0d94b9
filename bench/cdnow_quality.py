"""CDNOW quality table: every model of one pipeline run against the anchors and targets in params.yaml (report.targets).

Reads `reports/metrics.json` written by the evaluate stage (run `make run` or `dvc repro evaluate`
first, or pass --repro to run it). Prints what was measured; asserts nothing.

    python bench/cdnow_quality.py [--metrics reports/metrics.json] [--repro]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"))
    parser.add_argument("--repro", action="store_true", help="run `dvc repro evaluate` first")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="its report.targets are the targets")
    args = parser.parse_args()
    from uservalue.config import load_params
    from uservalue.reporting.page import meets

    targets = load_params(args.params).report.targets
    if args.repro:
        subprocess.run(["dvc", "repro", "evaluate"], check=True)
    report = json.loads(args.metrics.read_text())
    models = report["models"]
    print(f"CDNOW, evaluation cutoff {report['eval_cutoff']}, horizon {report['horizon_days']} days, "
          f"{report['users']} users; champion by {report['primary_metric']}: {report['champion']}\n")
    header = ["metric", "anchor", "target", *models]
    rows = []
    for metric, goal in targets.items():
        anchor, target, kind = goal.anchor, goal.target, goal.direction
        shown_target = f"±{target:.0%}" if kind == "abs" else (f">= {target}" if kind == "min" else f"<= {target}")
        cells = []
        for name in models:
            value = models[name][metric]
            text = f"{value:+.1%}" if metric == "total_error" else f"{value:.3f}"
            cells.append(text + (" ok" if meets(goal, value) else " --"))
        anchor_text = f"{anchor:+.1%}" if metric == "total_error" else f"{anchor}"
        rows.append([metric, anchor_text, shown_target, *cells])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
    champion = models[report["champion"]]
    missed = [m for m, goal in targets.items() if not meets(goal, champion[m])]
    print(f"\nchampion {report['champion']}: meets {len(targets) - len(missed)}/{len(targets)} targets"
          + (f"; short on {', '.join(missed)}" if missed else ""))
    print("(ok = meets the target, -- = short of it; anchors from params.yaml report.targets, measured on the same split)")


if __name__ == "__main__":
    main()
