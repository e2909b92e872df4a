"""A sweep with seeds read as a study: per point (a trial's settings less its seed), the mean ± standard deviation
of each metric over seeds and the point's rank, with SD3's own ranking of the same timestep scheme beside it.

SD3's ranks are Table 1 of Esser et al. 2024 ("rank averaged over all"): non-dominated sorting of CLIP score and
FID over 24 settings (EMA or not, two data sets, sampler steps). Lower is better; they are comparable only among
themselves, never with a rank measured here.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

from sd3ray.evaluation.figures import bar_plot
from sd3ray.sweeps.spec import SweepSpec

SD3_TABLE1_RANK = {  # rectified-flow variants of Table 1, under the labels SchemeSpec gives them
    "logit_normal(0,1)": 1.54, "logit_normal(1,0.6)": 2.08, "logit_normal(0.5,0.6)": 2.71, "mode(1.29)": 2.75,
    "logit_normal(0.5,1)": 2.83, "mode(1.75)": 3.33, "cosmap": 4.13, "uniform": 5.67,
}
STUDY_METRICS = ("samples/accuracy", "samples/cfid_ratio", "loss/val")


def study_metrics(spec: SweepSpec) -> list[str]:
    """What a study reports per point: the sweep's ranking metric first, then the study's own, each once."""
    return list(dict.fromkeys([spec.metric, *STUDY_METRICS]))


def point_label(row: dict[str, Any]) -> str:
    """The trial's label without its seed: the point the seeds repeat."""
    return row["trial"].rsplit("-seed", 1)[0] if "seed" in row else row["trial"]


def by_point(rows: list[dict[str, Any]], spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per point over its trials that reached the last step: n, mean and std of each metric, the rank by
    the sweep's metric (1 = best) and SD3's Table 1 rank of its scheme. Best first."""
    metrics = study_metrics(spec)
    points: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        points.setdefault(point_label(row), []).append(row)
    out = []
    for label, trials in points.items():
        done = [t for t in trials if t["status"] == "finished"]
        entry: dict[str, Any] = {"point": label, "scheme": trials[0]["scheme"], "seeds": len(done)}
        for key in metrics:
            values = [t[key] for t in done if t.get(key) is not None]
            entry[f"{key} mean"] = statistics.fmean(values) if values else None
            entry[f"{key} std"] = statistics.stdev(values) if len(values) > 1 else None
        entry["sd3 rank"] = SD3_TABLE1_RANK.get(trials[0]["scheme"])
        out.append(entry)
    key = f"{spec.metric} mean"
    sign = -1 if spec.mode == "max" else 1
    out.sort(key=lambda e: (e[key] is None, sign * (e[key] or 0)))
    for rank, entry in enumerate(out, start=1):
        entry["rank"] = rank if entry[key] is not None else None
    return out


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))


def study_markdown(points: list[dict[str, Any]], spec: SweepSpec) -> str:
    """mean ± std per metric, the rank here and SD3's rank."""
    metrics = study_metrics(spec)
    head = ["rank", "point", "seeds", *metrics, "SD3 Table 1 rank"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        cells = [f"{_fmt(p[f'{k} mean'])} ± {_fmt(p[f'{k} std'])}" if p[f"{k} mean"] is not None else ""
                 for k in metrics]
        lines.append("| " + " | ".join([_fmt(p["rank"]), p["point"], str(p["seeds"]), *cells,
                                         _fmt(p["sd3 rank"]) or "not in Table 1"]) + " |")
    return "\n".join(lines)


def study_plot(points: list[dict[str, Any]], spec: SweepSpec) -> np.ndarray:
    """The sweep's metric per point, mean with ± one standard deviation over seeds, best first."""
    shown = [p for p in points if p[f"{spec.metric} mean"] is not None]
    return bar_plot({p["point"]: p[f"{spec.metric} mean"] for p in shown}, spec.metric,
                    f"{spec.name}: {spec.metric}, mean ± std over seeds",
                    errors={p["point"]: p[f"{spec.metric} std"] or 0.0 for p in shown})
