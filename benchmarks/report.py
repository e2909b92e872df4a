"""The benchmark's outputs: a markdown table, flat metric names, and a run of its own in the tracker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.speed import eager_row, gemm_attention_share, speed_ceiling
from sd3ray.config import Config
from sd3ray.tracking.protocol import Tracker


def row_key(row: dict[str, Any]) -> str:
    return f"{row['model']}{'_compiled' if row['compiled'] else ''}"


def markdown_report(header: str, rows: list[dict[str, Any]], extras: list[dict[str, Any]],
                    ray_rows: list[dict[str, Any]]) -> str:
    """The benchmark as markdown: the model-step table, then sampling, data path, ceiling and Ray overhead."""
    reference = eager_row(rows, "diffusers")
    lines = [header, ""]
    if rows:  # none with --skip-models: no empty table
        lines += ["| model | compiled | params (M) | images/s | vs diffusers eager | GEMM+attention | MFU |",
                  "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['images_per_s'] / reference['images_per_s']:.2f}×" if reference else "-"
        share = f"{gemm_attention_share(r):.0%}" if "gemm_s" in r else "-"
        shown_mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['model']} | {r['compiled']} | {r['params_m']:.1f} | {r['images_per_s']:.3g} | {ratio} "
                     f"| {share} | {shown_mfu} |")
    lines.append("")
    ceiling = speed_ceiling(rows)
    if ceiling is not None:
        lines.append(f"ceiling: a step that kept only sd3ray's GEMM and attention time would run {ceiling:.2f}× "
                     f"eager diffusers on this device")
    lines += [f"{e['what']}: {e['images_per_s']:.3g} images/s" for e in extras]
    if ray_rows:
        lines += ["", "| setup | images/s | vs local | fixed s |", "|---|---|---|---|"]
        lines += [f"| {r['setup']} | {r['images_per_s']:.0f} | {r['vs_local']:.2f}× | {r['fixed_s']:.1f} |"
                  for r in ray_rows]
    return "\n".join(lines) + "\n"


def benchmark_metrics(rows: list[dict[str, Any]], extras: list[dict[str, Any]],
                      ray_rows: list[dict[str, Any]]) -> dict[str, float]:
    """The figures as flat MLflow metric names."""
    metrics: dict[str, float] = {}
    reference = eager_row(rows, "diffusers")
    for r in rows:
        key = f"bench/{row_key(r)}"
        metrics[f"{key}/images_per_s"] = r["images_per_s"]
        if reference is not None:
            metrics[f"{key}/vs_diffusers_eager"] = r["images_per_s"] / reference["images_per_s"]
        if (share := gemm_attention_share(r)) is not None:
            metrics[f"{key}/gemm_attention_share"] = share
        if r.get("mfu") is not None:
            metrics[f"{key}/mfu"] = r["mfu"]
    if (ceiling := speed_ceiling(rows)) is not None:
        metrics["bench/speed_ceiling_vs_diffusers"] = ceiling
    for e in extras:
        metrics[f"bench/{e['key']}/images_per_s"] = e["images_per_s"]
    for r in (r for r in ray_rows if r["ray"]):
        streamed = "_streamed" if r.get("loading") == "stream" else ""
        metrics[f"bench/ray_{r['workers']}x{r['cpus_per_worker']}cpu{streamed}/vs_local"] = r["vs_local"]
    return metrics


def log_benchmark(tracker: Tracker, cfg: Config, run_name: str, tags: dict[str, str], metrics: dict[str, float],
                  chart: np.ndarray, files: list[Path]) -> str | None:
    """Log one benchmark as its own run: the benchmarked config as params, the figures as metrics, the device and
    versions as tags, a throughput chart, and the table and JSON as artifacts."""
    run_id = tracker.start(cfg, None, tags={"sd3ray.kind": "benchmark", **tags}, run_name=run_name)
    tracker.log_metrics(metrics, 0)
    tracker.log_image("benchmark_images_per_s", chart, 0)
    for path in files:
        tracker.log_artifact(path, "benchmark")
    tracker.finish("FINISHED")
    return run_id
