"""`reports/index.html`: one static page for the outcome of a run — the models against the anchors and
targets, the gains and calibration plots (inline SVG), the registry's decision and why, the champion's
lineage, the validation summary and the drift verdict, with links to the Data Docs and the Evidently
report. Self-contained: no script, no remote asset; readable from the file system without a server.

Every figure shown is also in a `data-value` attribute at full precision, so tests (and scripts) read the
page's numbers exactly and compare them with the JSON files they came from."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from uservalue.config import MetricTarget

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1f2328; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem;
     border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
table { border-collapse: collapse; margin: .5rem 0; } th, td { padding: .3rem .7rem; border: 1px solid #d0d7de;
     text-align: right; } th:first-child, td:first-child { text-align: left; }
td.ok { background: #dafbe1; } td.miss { background: #fff1e5; } th.champion, td.champion { font-weight: 700; }
.muted { color: #57606a; } .verdict { display: inline-block; padding: .15rem .6rem; border-radius: 1rem; }
.good { background: #dafbe1; } .bad { background: #ffebe9; } .plots { display: flex; flex-wrap: wrap; gap: 1rem; }
.plots figure { margin: 0; } code { background: #f6f8fa; padding: .1rem .3rem; border-radius: 4px; }
"""


@dataclass(frozen=True)
class RunOutcome:
    """What the pipeline's stages wrote, as the page needs it (loaded by the caller; None: not produced)."""

    metrics: Mapping[str, Any]
    gains: pd.DataFrame
    deciles: pd.DataFrame  # decile, <model>... (mean predicted per decile of the model's ranking)
    deciles_actual: pd.DataFrame  # decile, actual
    registry: Mapping[str, Any] | None = None
    package: Mapping[str, Any] | None = None
    validation: Mapping[str, Any] | None = None
    monitoring: Mapping[str, Any] | None = None
    recs: Mapping[str, Any] | None = None  # reports/recs_metrics.json (train_recs)
    lineage: Mapping[str, str] = field(default_factory=dict)  # label -> value (git commit, data hash, ...)
    links: Mapping[str, str] = field(default_factory=dict)  # data_docs, drift_report, mlflow_run: relative/absolute


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float, metric: str) -> str:
    return f"{value:+.1%}" if metric == "total_error" else f"{value:.3f}"


def meets(target: MetricTarget, value: float) -> bool:
    return target.holds(value)


def _target_text(metric: str, target: MetricTarget) -> str:
    if target.direction == "abs":
        return f"within ±{_number(target.target, metric).lstrip('+')}"
    return ("≥ " if target.direction == "min" else "≤ ") + _number(target.target, metric)


def model_table(metrics: Mapping[str, Any], targets: Mapping[str, MetricTarget]) -> str:
    models: Mapping[str, Mapping[str, float]] = metrics["models"]
    champion = metrics.get("champion")
    names = list(models)
    measured = sorted({m for scores in models.values() for m in scores})
    ordered = [m for m in targets if m in measured] + [m for m in measured if m not in targets]
    head = "".join(f'<th class="{"champion" if n == champion else ""}">{_e(n)}{" ★" if n == champion else ""}</th>'
                   for n in names)
    rows = []
    for metric in ordered:
        target = targets.get(metric)
        cells = []
        for name in names:
            value = models[name].get(metric)
            if value is None:
                cells.append("<td>–</td>")
                continue
            verdict = "" if target is None else ("ok" if meets(target, value) else "miss")
            classes = " ".join(c for c in (verdict, "champion" if name == champion else "") if c)
            cells.append(f'<td class="{classes}" data-model="{_e(name)}" data-metric="{_e(metric)}" '
                         f'data-value="{value!r}">{_number(value, metric)}</td>')
        anchor = (f'<td title="{_e(target.anchor_source)}">{_number(target.anchor, metric)}</td>'
                  if target is not None and target.anchor is not None else "<td>–</td>")
        goal = f"<td>{_e(_target_text(metric, target))}</td>" if target is not None else "<td>–</td>"
        rows.append(f"<tr><td>{_e(metric)}</td>{anchor}{goal}{''.join(cells)}</tr>")
    return (f"<table><thead><tr><th>metric</th><th>anchor</th><th>target</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _svg(spec: dict[str, Any]) -> str:
    import vl_convert

    svg = vl_convert.vegalite_to_svg(spec)
    return svg[svg.index("<svg"):]  # drop the XML prolog: the SVG is inline in HTML


def gains_svg(gains: pd.DataFrame) -> str:
    long = gains.melt(id_vars="fraction_users", var_name="model", value_name="share_of_value")
    diagonal = pd.DataFrame({"fraction_users": [0.0, 1.0], "model": "random", "share_of_value": [0.0, 1.0]})
    data = pd.concat([long, diagonal]).to_dict(orient="records")
    return _svg({
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json", "width": 420, "height": 300,
        "title": "Gains: share of actual value in the top users by prediction",
        "data": {"values": data}, "mark": {"type": "line"},
        "encoding": {"x": {"field": "fraction_users", "type": "quantitative", "title": "share of users"},
                     "y": {"field": "share_of_value", "type": "quantitative", "title": "share of value"},
                     "color": {"field": "model", "type": "nominal"},
                     "strokeDash": {"condition": {"test": "datum.model === 'random'", "value": [4, 4]},
                                    "value": [1, 0]}},
    })


def calibration_svg(deciles: pd.DataFrame, actual: pd.DataFrame, model: str) -> str:
    frame = deciles[["decile", model]].rename(columns={model: "predicted"}).merge(actual, on="decile")
    data = frame.melt(id_vars="decile", var_name="series", value_name="mean_value").to_dict(orient="records")
    return _svg({
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json", "width": 420, "height": 300,
        "title": f"Calibration of {model}: mean predicted vs actual value per decile",
        "data": {"values": data}, "mark": {"type": "line", "point": True},
        "encoding": {"x": {"field": "decile", "type": "ordinal", "title": "decile of predicted value"},
                     "y": {"field": "mean_value", "type": "quantitative", "title": "mean value"},
                     "color": {"field": "series", "type": "nominal"}},
    })


def _definition_list(items: Sequence[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in items) + "</table>"


def _link(href: str | None, text: str) -> str:
    return f'<a href="{_e(href)}">{_e(text)}</a>' if href else _e(text)


def registry_section(registry: Mapping[str, Any] | None) -> str:
    if registry is None:
        return "<p class='muted'>No registry decision yet (the register stage has not run).</p>"
    candidate, decision = registry["candidate"], registry["decision"]
    promoted = bool(decision["promote"])
    verdict = (f'<span class="verdict {"good" if promoted else "bad"}" data-key="registry.promote" '
               f'data-value="{str(promoted).lower()}">{"promoted to champion" if promoted else "not promoted"}</span>')
    reasons = "".join(f"<li>{_e(r)}</li>" for r in decision["reasons"])
    return (f"<p>Candidate <b>{_e(candidate['model'])}</b>, version "
            f"<span data-key=\"registry.candidate.version\" data-value=\"{_e(candidate['version'])}\">"
            f"{_e(candidate['version'])}</span> of <code>{_e(registry['model_name'])}</code> → alias "
            f"<code data-key=\"registry.alias\" data-value=\"{_e(decision['alias'])}\">{_e(decision['alias'])}</code>: "
            f"{verdict}; champion version <span data-key=\"registry.champion_version\" "
            f"data-value=\"{_e(registry.get('champion_version'))}\">{_e(registry.get('champion_version'))}</span> "
            f"(gate: {_e(registry['primary_metric'])}, min delta {_e(registry['min_delta'])}).</p><ul>{reasons}</ul>")


def validation_section(summary: Mapping[str, Any] | None, docs: str | None) -> str:
    if summary is None:
        return "<p class='muted'>No validation summary.</p>"
    success = bool(summary["success"])
    failed = "".join(f"<li>{_e(f.get('expectation', f))}</li>" for f in summary.get("failed_expectations", []))
    items = [("verdict", f'<span class="verdict {"good" if success else "bad"}" data-key="validation.success" '
                         f'data-value="{str(success).lower()}">{"passed" if success else "failed"}</span>'),
             ("rows", f'<span data-key="validation.rows" data-value="{summary["rows"]}">{summary["rows"]:,}</span>'),
             ("rows quarantined", f"{summary.get('rows_quarantined', 0):,} (mode {_e(summary.get('mode'))})"),
             ("expectations evaluated", _e(summary.get("expectations_evaluated"))),
             ("Data Docs", _link(docs, "Great Expectations Data Docs"))]
    return _definition_list(items) + (f"<p>Failed:</p><ul>{failed}</ul>" if failed else "")


def drift_section(monitoring: Mapping[str, Any] | None, report: str | None) -> str:
    if monitoring is None:
        return "<p class='muted'>No drift verdict (the monitor stage has not run).</p>"
    drifted = bool(monitoring["drift_detected"])
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td>{_e(col['method'])}</td><td>{col['score']:.3f}</td>"
        f"<td>{col['threshold']:.3f}</td><td>{'drifted' if col['drifted'] else 'stable'}</td></tr>"
        for name, col in monitoring.get("columns", {}).items())
    return (f'<p><span class="verdict {"bad" if drifted else "good"}" data-key="monitoring.drift_detected" '
            f'data-value="{str(drifted).lower()}">{"drift detected" if drifted else "no drift"}</span> — drifted share '
            f'<span data-key="monitoring.drifted_share" data-value="{monitoring["drifted_share"]!r}">'
            f'{monitoring["drifted_share"]:.2f}</span> ({_link(report, "Evidently report")}).</p>'
            f"<table><thead><tr><th>column</th><th>method</th><th>score</th><th>threshold</th><th>verdict</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>")


RECS_METRICS = ("recall_at_20", "ndcg_at_20", "hit_rate_at_10", "coverage")


def recs_section(recs: Mapping[str, Any] | None) -> str:
    """The recommenders of reports/recs_metrics.json against each other (and the planted truth, on synthetic data)."""
    if recs is None:
        return "<p class='muted'>No recommendation metrics (the train_recs stage has not run).</p>"
    if recs.get("skipped"):
        return f"<p class='muted'>Skipped: {_e(recs['skipped'])}.</p>"
    champion = recs.get("champion")
    rows = dict(recs.get("models", {}))
    if recs.get("planted_truth"):
        rows["planted truth"] = recs["planted_truth"]
    head = "".join(f"<th>{_e(k)}</th>" for k in RECS_METRICS)
    body = "".join(
        f"<tr><td{' class=champion' if name == champion else ''}>{_e(name)}{' ★' if name == champion else ''}</td>"
        + "".join(f'<td data-key="recs.{_e(name)}.{k}" data-value="{float(m[k])!r}">{float(m[k]):.4f}</td>'
                  for k in RECS_METRICS) + "</tr>"
        for name, m in rows.items())
    ratios = "".join(f"<li>{_e(k)}: {float(v):.2f}</li>" for k, v in recs.get("ratios", {}).items())
    return (f"<p>Fitted on events before {_e(recs.get('eval_cutoff'))}, scored on the items of each user's events in "
            f"the {_e(recs.get('horizon_days'))} days after it ({_e(recs.get('users'))} users); champion by "
            f"{_e(recs.get('primary_metric'))}: <b data-key=\"recs.champion\" data-value=\"{_e(champion)}\">"
            f"{_e(champion)}</b>.</p><table><thead><tr><th>model</th>{head}</tr></thead><tbody>{body}</tbody></table>"
            + (f"<ul>{ratios}</ul>" if ratios else ""))


def render_page(outcome: RunOutcome, targets: Mapping[str, MetricTarget], now: dt.datetime) -> str:
    metrics = outcome.metrics
    champion = metrics["champion"]
    summary = [("champion (by " + _e(metrics.get("primary_metric", "")) + ")",
                f'<b data-key="metrics.champion" data-value="{_e(champion)}">{_e(champion)}</b>'),
               ("evaluation cutoff", _e(metrics.get("eval_cutoff"))),
               ("horizon", f"{_e(metrics.get('horizon_days'))} days"),
               ("users evaluated", _e(metrics.get("users")))]
    lineage = [(label, f"<code>{_e(value)}</code>") for label, value in outcome.lineage.items()]
    if outcome.links.get("mlflow_run"):
        lineage.append(("MLflow UI", _link(outcome.links["mlflow_run"], "the champion's run")))
    plots = [gains_svg(outcome.gains)]
    if champion in outcome.deciles.columns:
        plots.append(calibration_svg(outcome.deciles, outcome.deciles_actual, champion))
    figures = "".join(f"<figure>{svg}</figure>" for svg in plots)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>uservalue — latest run</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>uservalue — latest run</h1>
<p class="muted">Written {_e(now.isoformat(timespec="seconds"))} by the <code>report</code> stage.</p>
{_definition_list(summary)}
<h2>Models against the anchors and targets</h2>
<p class="muted">Green: meets its target; orange: misses it. ★ the evaluation champion.</p>
{model_table(metrics, targets)}
<h2>Gains and calibration</h2>
<div class="plots">{figures}</div>
<h2>Registry decision</h2>
{registry_section(outcome.registry)}
<h2>Recommendations</h2>
{recs_section(outcome.recs)}
<h2>Champion lineage</h2>
{_definition_list(lineage) if lineage else "<p class='muted'>No lineage recorded.</p>"}
<h2>Validation</h2>
{validation_section(outcome.validation, outcome.links.get("data_docs"))}
<h2>Drift</h2>
{drift_section(outcome.monitoring, outcome.links.get("drift_report"))}
</body></html>
"""
