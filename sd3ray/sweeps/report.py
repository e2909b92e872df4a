"""What a person opens in the MLflow UI to decide a sweep: the parent run's table, plot and best grids."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sd3ray.errors import Sd3rayError, explained_error
from sd3ray.evaluation.figures import line_plot
from sd3ray.storage import redact
from sd3ray.sweeps.spec import SchemeSpec, SweepSpec, base_config, resolved_params, trial_label
from sd3ray.sweeps.study import by_point, study_markdown, study_plot
from sd3ray.tracking.protocol import Tracker

SUMMARY_METRICS = ("loss/val", "samples/accuracy", "samples/cfid_ratio")
# a trial's status -> the MLflow status its child run ends with when the trial did not end it itself
CLOSED_AS = {"stopped early": "KILLED", "failed": "FAILED"}


class SweepFailed(Sd3rayError):
    """Every trial of a sweep failed: nothing was trained to rank or register."""


def summarize(results: Any, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial of a Tune ResultGrid: settings, status, step reached, metrics (last report), and for a
    trial stopped early, why."""
    steps = base_config(spec).train.steps
    rows, histories = [], {}
    for result in results:
        # a restored sweep has no config for trials that failed before their first report; Tune's params.json does
        config = result.config or json.loads((Path(result.path) / "params.json").read_text())
        params, metrics = resolved_params(spec, config["params"]), result.metrics or {}
        reached = metrics.get("step", 0)
        status = "failed" if result.error else ("finished" if reached >= steps else "stopped early")
        row = {"trial": trial_label(params), "width": params["width"], "scheme": SchemeSpec(**params["scheme"]).label}
        row.update({dim.key: params.get("set", {}).get(dim.key) for dim in spec.space})
        row.update({"seed": params["seed"]} if "seed" in params else {})
        row.update({"status": status, "step": reached, spec.metric: metrics.get(spec.metric)})
        row.update({k: metrics.get(k) for k in SUMMARY_METRICS})
        row["error"] = error_line(result.error) if result.error else ""
        rows.append(row)
        histories[row["trial"]] = metric_history(result, spec.metric)
    for row in rows:
        row["stopped_because"] = stop_reason(row, histories, spec) if row["status"] == "stopped early" else ""
    sign = -1 if spec.mode == "max" else 1  # best first; trials without the metric last
    return sorted(rows, key=lambda r: (r[spec.metric] is None, sign * (r[spec.metric] or 0)))


def error_line(error: BaseException) -> str:
    """A trial's error in one line: sd3ray's own message when Ray's wrappers hold one (it says what to fix), else the
    last line of what Tune recorded (the exception under Ray's traceback)."""
    known = explained_error(error)
    cause = getattr(known, "cause", None)  # Ray's RayTaskError(DataError) is a DataError whose text is the traceback
    known = cause if isinstance(cause, Sd3rayError) else known
    text = f"{type(known).__name__}: {known}" if known is not None else str(error).strip()
    lines = text.splitlines() or [type(error).__name__]
    return redact(lines[-1].strip())[:300]


def failure_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The summary's failures, one line per failed trial: `label: error`."""
    return [f"{row['trial']}: {row['error']}" for row in rows if row["status"] == "failed"]


def summary_text(rows: list[dict[str, Any]]) -> str:
    """What the console shows when a sweep ends: the table, then each failed trial with its error."""
    failures = failure_lines(rows)
    lines = [to_markdown(rows)]
    if failures:
        lines += [f"sd3ray: {len(failures)} of {len(rows)} trials failed:", *(f"  {line}" for line in failures)]
    return "\n".join(lines)


def all_failed(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and all(row["status"] == "failed" for row in rows)


def check_some_trial_ran(rows: list[dict[str, Any]], spec: SweepSpec, logs: str) -> None:
    """A sweep whose trials all failed is a failed sweep (the job exits non-zero); one where some failed is not:
    the summary lists those beside the trials that ran."""
    if all_failed(rows):
        raise SweepFailed(f"all {len(rows)} trials of sweep '{spec.name}' failed (each is listed above with its error; "
                          f"tracebacks are in the trials' error.txt under {redact(logs)}). The first: "
                          f"{failure_lines(rows)[0]}. Fix that and run the sweep again, without --resume (it does not "
                          f"retry failed trials)")


def metric_history(result: Any, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every report of one trial that carried `metric`, by step."""
    frame = getattr(result, "metrics_dataframe", None)
    if frame is None or metric not in frame or "step" not in frame:
        return []
    pairs = frame[["step", metric]].dropna()
    return sorted((int(step), float(value)) for step, value in zip(pairs["step"], pairs[metric]))


def value_at(history: list[tuple[int, float]], step: int) -> float | None:
    """A trial's metric at its first report at or after `step`: what ASHA compares at a rung."""
    return next((value for at, value in history if at >= step), None)


def stop_reason(row: dict[str, Any], histories: dict[str, list[tuple[int, float]]], spec: SweepSpec) -> str:
    """Why a trial ended before train.steps: ASHA's rung at the step it stopped, with its value against the
    trials that reached that step (ASHA keeps the best 1/reduction_factor there)."""
    step = row["step"]
    if not spec.asha.enabled:
        return f"ended at step {step} without an error (ASHA is off: a time budget or an interruption)"
    mine = value_at(histories.get(row["trial"], []), step)
    peers = [v for h in histories.values() if (v := value_at(h, step)) is not None]
    factor = spec.asha.reduction_factor
    if mine is None or not peers:
        return f"ASHA at step {step}"
    ranked = sorted(peers, reverse=spec.mode == "max")
    kept = ranked[max(1, len(ranked) // factor) - 1]
    return (f"ASHA at step {step}: {spec.metric} {mine:.4g}, outside the best 1/{factor} of the {len(peers)} "
            f"trials that reached that step (the last one kept: {kept:.4g})")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))


def to_markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def metric_vs_width(rows: list[dict[str, Any]], spec: SweepSpec) -> np.ndarray:
    """The best value per (scheme, width) among trials that reported the metric."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    pick = max if spec.mode == "max" else min
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        xs, ys = [], []
        for width in sorted({r["width"] for r in rows}):
            values = [r[spec.metric] for r in rows if r["scheme"] == scheme and r["width"] == width
                      and r[spec.metric] is not None]
            if values:
                xs.append(width)
                ys.append(pick(values))
        series[scheme] = (xs, ys)
    return line_plot(series, "model width", spec.metric, f"{spec.name}: {spec.metric} by width", logx=True)


def best_grids(tracker: Tracker, rows: list[dict[str, Any]]) -> np.ndarray:
    """The final sample grid of the best trial per scheme, side by side, titled with the trial's label."""
    from sd3ray.evaluation.figures import figure_to_array, pyplot

    best: dict[str, dict[str, Any]] = {}
    for row in rows:  # rows are sorted best first
        if row["status"] != "failed":
            best.setdefault(row["scheme"], row)
    panels = []
    for scheme, row in best.items():
        grid = tracker.latest_child_image(row["trial"], "samples/grid")
        if grid is not None:
            panels.append((f"{scheme}\n{row['trial']}", grid))
    if not panels:
        return np.full((32, 32, 3), 255, np.uint8)
    fig, axes = pyplot().subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), dpi=100, squeeze=False)
    for ax, (title, image) in zip(axes[0], panels):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return figure_to_array(fig)


def write_summary(tracker: Tracker, results: Any, spec: SweepSpec) -> list[dict[str, Any]]:
    """Log the sweep's table (CSV, markdown), metric-vs-width plot and best grids to the parent run, and end the
    child runs of trials that Tune stopped (KILLED, with the reason as a tag) or that failed."""
    rows = summarize(results, spec)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "results.csv").write_text(to_csv(rows))
        (Path(tmp) / "results.md").write_text(to_markdown(rows) + "\n")
        tracker.log_artifact(Path(tmp), "sweep")
    if spec.seeds > 1:  # a study: mean ± std over seeds per point, ranked, beside SD3's ranking
        points = by_point(rows, spec)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "study.md").write_text(study_markdown(points, spec) + "\n")
            tracker.log_artifact(Path(tmp), "sweep")
        tracker.log_image("study_by_point", study_plot(points, spec), 0)
        print(study_markdown(points, spec), flush=True)
    tracker.log_image("metric_vs_width", metric_vs_width(rows, spec), 0)
    tracker.log_image("best_grid_per_scheme", best_grids(tracker, rows), 0)
    for row in rows:  # Tune ended these trials' workers before they could end their own MLflow runs
        if row["status"] in CLOSED_AS:
            tracker.close_child_run(row["trial"], CLOSED_AS[row["status"]],
                                    {"sd3ray.trial_status": row["status"],
                                     "sd3ray.stopped_because": row["stopped_because"] or row["error"]})
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "stopped early", "failed")}
    tracker.log_metrics({f"sweep/{k.replace(' ', '_')}": v for k, v in counts.items()}, 0)
    if spec.registered_model and rows and rows[0][spec.metric] is not None:
        version = tracker.register_child_model(rows[0]["trial"], spec.registered_model)
        if version:
            tracker.set_tags({"sd3ray.registered_model": version, "sd3ray.best_trial": rows[0]["trial"]})
            print(f"sd3ray: best trial {rows[0]['trial']} registered as {version}", flush=True)
    return rows
