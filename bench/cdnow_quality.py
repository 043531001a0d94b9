"""CDNOW quality table: every model of one pipeline run against the anchors and targets of issue 3.

Reads `reports/metrics.json` written by the evaluate stage (run `make run` or `dvc repro evaluate`
first, or pass --repro to run it). Prints what was measured; asserts nothing.

    python bench/cdnow_quality.py [--metrics reports/metrics.json] [--repro]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

# metric -> (best anchor measured on this split, where it came from, target, direction)
TARGETS = {
    "gini": (0.712, "LightGBM, squared error", 0.73, "min"),
    "spearman": (0.479, "calibration repeat spend run-rate", 0.50, "min"),
    "top_decile_capture": (0.526, "LightGBM Tweedie", 0.54, "min"),
    "decile_mape": (0.149, "LightGBM Tweedie", 0.10, "max"),
    "total_error": (-0.011, "LightGBM Tweedie", 0.03, "abs"),
    "rmse": (92.9, "Pareto/NBD + Gamma-Gamma", 91.0, "max"),
    "auc": (0.769, "LightGBM classifier", 0.78, "min"),
}


def meets(metric: str, value: float) -> bool:
    _anchor, _source, target, kind = TARGETS[metric]
    if kind == "min":
        return value >= target
    if kind == "max":
        return value <= target
    return abs(value) <= target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"))
    parser.add_argument("--repro", action="store_true", help="run `dvc repro evaluate` first")
    args = parser.parse_args()
    if args.repro:
        subprocess.run(["dvc", "repro", "evaluate"], check=True)
    report = json.loads(args.metrics.read_text())
    models = report["models"]
    print(f"CDNOW, evaluation cutoff {report['eval_cutoff']}, horizon {report['horizon_days']} days, "
          f"{report['users']} users; champion by {report['primary_metric']}: {report['champion']}\n")
    header = ["metric", "anchor", "target", *models]
    rows = []
    for metric, (anchor, _source, target, kind) in TARGETS.items():
        shown_target = f"±{target:.0%}" if kind == "abs" else (f">= {target}" if kind == "min" else f"<= {target}")
        cells = []
        for name in models:
            value = models[name][metric]
            text = f"{value:+.1%}" if metric == "total_error" else f"{value:.3f}"
            cells.append(text + (" ok" if meets(metric, value) else " --"))
        anchor_text = f"{anchor:+.1%}" if metric == "total_error" else f"{anchor}"
        rows.append([metric, anchor_text, shown_target, *cells])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
    champion = models[report["champion"]]
    missed = [m for m in TARGETS if not meets(m, champion[m])]
    print(f"\nchampion {report['champion']}: meets {len(TARGETS) - len(missed)}/{len(TARGETS)} targets"
          + (f"; short on {', '.join(missed)}" if missed else ""))
    print("(ok = meets the target, -- = short of it; anchors from issue 3, measured on the same split)")


if __name__ == "__main__":
    main()
