"""Ray Train against local mode: steady-state images/s of the same config in this process and on Ray workers,
with the fixed costs (start-up, data loading, final evaluation, teardown) reported apart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from sd3ray.config import Config, apply_overrides, from_dict, to_dict

# (label, workers, CPUs per worker, data.loading); "{threads}" is the number of threads local mode uses
RAY_SETUPS = (("ray 1 worker × {threads} CPU", 1, 0, "memory"), ("ray 1 worker × 1 CPU", 1, 1, "memory"),
              ("ray 2 workers × 1 CPU", 2, 1, "memory"),
              ("ray 1 worker × 1 CPU, streamed by Ray Data (1 CPU)", 1, 1, "stream"))
Setup = tuple[str, int, int, str]


def ray_setups(threads: int) -> list[Setup]:
    """The setups the benchmark compares with local mode; 0 CPUs per worker means `threads`."""
    return [(label.format(threads=threads), workers, cpus or threads, loading)
            for label, workers, cpus, loading in RAY_SETUPS]


def ray_overhead_config(cfg: Config, steps: int, output_dir: str) -> Config:
    """The config cut to a throughput run: `steps` steps logged twice, so the reported rate is the second half's
    (warm-up excluded, half the run averaged), and one evaluation without samples."""
    return from_dict(apply_overrides(to_dict(cfg), [f"train.steps={steps}", f"train.log_every={max(1, steps // 2)}",
                                 f"train.eval_every={steps}", f"train.ckpt_every={steps}", "eval.num_samples=0",
                                 f"train.output_dir={output_dir}"]))


def ray_overhead_rows(cfg: Config, setups: list[Setup],
                      local_beside_cluster: bool = False) -> list[dict[str, Any]]:
    """Steady-state images/s of local mode, then of Ray Train for each (name, workers, cpus per worker, loading)
    setup: the training split in memory, or streamed by Ray Data (which takes one more CPU).

    images/s is the rate over the second half of the run; "fixed_s" is wall time minus the steps at
    that rate: start-up, data loading, final evaluation and teardown. The first row is local mode. With
    `local_beside_cluster`, local mode runs again once the Ray cluster is up: on a small machine the cluster's own
    processes take CPU time, and that row separates their cost from Ray Train's.
    """
    from sd3ray.cluster.connect import connect
    from sd3ray.cluster.trainer import build_trainer
    from sd3ray.training.local import run_local

    rows = []

    def record(name: str, on_ray: bool, workers: int, cpus: int, wall: float, metrics: dict[str, Any],
               loading: str = "memory") -> None:
        rate = metrics["train/images_per_s"]
        fixed = wall - cfg.train.steps * cfg.train.batch_size * workers / rate
        rows.append({"setup": name, "ray": on_ray, "workers": workers, "cpus_per_worker": cpus, "loading": loading,
                     "images_per_s": rate, "wall_s": wall, "fixed_s": fixed,
                     "vs_local": rate / rows[0]["images_per_s"] if rows else 1.0})
        print(f"{name}: {rate:.0f} img/s, wall {wall:.1f}s, fixed {fixed:.1f}s", flush=True)

    started = time.perf_counter()
    local = run_local(cfg, "local", "local", device="cpu", tracking=False)
    threads = torch.get_num_threads()
    record(f"local ({threads} threads)", False, 1, threads, time.perf_counter() - started, local.metrics)
    connect()
    if local_beside_cluster:
        started = time.perf_counter()
        local = run_local(cfg, "local-beside-ray", "local-beside-ray", device="cpu", tracking=False)
        record(f"local ({threads} threads), Ray cluster up", False, 1, threads, time.perf_counter() - started,
               local.metrics)
    for name, workers, cpus, loading in setups:
        started = time.perf_counter()
        setup_cfg = from_dict(apply_overrides(to_dict(cfg), [f"data.loading={loading}"]))
        result = build_trainer(setup_cfg, f"bench-{workers}x{cpus}-{loading}", workers=workers, tracking=False,
                               storage_path=str(Path(cfg.train.output_dir) / "ray"), cpus_per_worker=cpus).fit()
        record(name, True, workers, cpus, time.perf_counter() - started, result.metrics, loading)
    return rows


def interleaved_ray_rows(cfg: Config, repeats: int) -> list[dict[str, Any]]:
    """Local mode and one Ray worker with as many CPUs as local mode has threads, run alternately `repeats` times
    (local, Ray, local, Ray, ...) with the cluster up throughout, so the machine's drift falls on both: each run's
    steady images/s, and per pair the Ray run over the local run just before it."""
    import statistics

    from sd3ray.cluster.connect import connect
    from sd3ray.cluster.trainer import build_trainer
    from sd3ray.training.local import run_local

    connect()
    threads, rows = torch.get_num_threads(), []
    for repeat in range(repeats):
        local = run_local(cfg, f"local-{repeat}", f"local-{repeat}", device="cpu", tracking=False)
        ray_run = build_trainer(cfg, f"bench-interleaved-{repeat}", workers=1, tracking=False, cpus_per_worker=threads,
                                storage_path=str(Path(cfg.train.output_dir) / "ray")).fit()
        local_rate, ray_rate = local.metrics["train/images_per_s"], ray_run.metrics["train/images_per_s"]
        rows.append({"repeat": repeat, "local_images_per_s": local_rate, "ray_images_per_s": ray_rate,
                     "ray_vs_local": ray_rate / local_rate})
        print(f"pair {repeat}: local {local_rate:.0f} img/s, Ray 1 worker × {threads} CPU {ray_rate:.0f} img/s "
              f"({ray_rate / local_rate:.2f}×)", flush=True)
    rows.append({"repeat": "median", **{key: statistics.median(r[key] for r in rows) for key in
                                        ("local_images_per_s", "ray_images_per_s", "ray_vs_local")}})
    return rows


def interleaved_markdown(rows: list[dict[str, Any]], threads: int) -> str:
    lines = ["", f"| pair | local images/s | Ray 1 worker × {threads} CPU images/s | Ray vs local |",
             "|---|---|---|---|"]
    return "\n".join(lines + [f"| {r['repeat']} | {r['local_images_per_s']:.0f} | {r['ray_images_per_s']:.0f} | "
                              f"{r['ray_vs_local']:.2f}× |" for r in rows]) + "\n"


def stream_read_rows(cfg: Config, data_cpus: list[int]) -> list[dict[str, Any]]:
    """The streaming path alone, without training: rows/s of one pass over the training split through Ray Data
    (read, decode, batch) with its tasks limited to each number of CPUs."""
    import ray.data
    from ray.data import ExecutionResources

    from sd3ray.cluster.connect import connect
    from sd3ray.cluster.ray_data import train_dataset

    connect()
    rows = []
    context = ray.data.DataContext.get_current()
    for cpus in data_cpus:
        context.execution_options.resource_limits = ExecutionResources.for_limits(cpu=cpus)
        started, count = time.perf_counter(), 0
        for batch in train_dataset(cfg).iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy"):
            count += len(batch["label"])
        rate = count / (time.perf_counter() - started)
        rows.append({"data_cpus": cpus, "rows": count, "rows_per_s": rate})
        print(f"Ray Data with {cpus} CPU(s): {rate:,.0f} images/s over {count} images", flush=True)
    context.execution_options.resource_limits = ExecutionResources.for_limits()
    return rows


def stream_read_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["", "| Ray Data CPUs | images/s read, decoded and batched |", "|---|---|"]
    return "\n".join(lines + [f"| {r['data_cpus']} | {r['rows_per_s']:,.0f} |" for r in rows]) + "\n"
