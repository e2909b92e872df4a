"""Ray Train overhead: steady-state images/s of --local vs Ray Train workers, with fixed costs reported apart.

    python jobs/benchmark_ray.py --config configs/mnist_tiny.yaml --steps 200

Runs the same config (1) in this process, (2) on 1 Ray worker with all the CPUs local mode uses, (3) on 1 worker
with 1 CPU and (4) on 2 workers with 1 CPU each. images/s is the rate over the last log interval (after warm-up);
"fixed" is wall time minus steps at that rate: start-up, data loading, final evaluation and teardown.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

import argparse
import json
import tempfile
import time

import torch

from sd3ray.cli import add_config_args, config_from_args, positive_int


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default="configs/mnist_tiny.yaml")
    parser.add_argument("--steps", type=positive_int, default=200)
    parser.add_argument("--output", type=Path, default=Path("benchmark_ray.json"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sd3ray-bench-"))
    cfg = config_from_args(parser, args, [f"train.steps={args.steps}", f"train.log_every={args.steps // 4}",
                                          f"train.eval_every={args.steps}", f"train.ckpt_every={args.steps}",
                                          "eval.num_samples=0", f"train.output_dir={tmp}"])
    threads = torch.get_num_threads()
    rows = []

    def record(name: str, workers: int, wall: float, metrics: dict) -> None:
        rate = metrics["train/images_per_s"]
        fixed = wall - args.steps * cfg.train.batch_size * workers / rate
        rows.append({"setup": name, "workers": workers, "images_per_s": rate, "wall_s": wall, "fixed_s": fixed})
        print(f"{name}: {rate:.0f} img/s, wall {wall:.1f}s, fixed {fixed:.1f}s", flush=True)

    from sd3ray.local import run_local

    started = time.perf_counter()
    local = run_local(cfg, "local", "local", device="cpu", tracking=False)
    record(f"local ({threads} threads)", 1, time.perf_counter() - started, local.metrics)

    from sd3ray.ray_train import build_trainer, connect

    connect()
    for name, workers, cpus in [(f"ray 1 worker × {threads} CPU", 1, threads), ("ray 1 worker × 1 CPU", 1, 1),
                                ("ray 2 workers × 1 CPU", 2, 1)]:
        started = time.perf_counter()
        result = build_trainer(cfg, f"bench-{workers}x{cpus}", workers=workers, tracking=False,
                               storage_path=str(tmp / "ray"), cpus_per_worker=cpus).fit()
        record(name, workers, time.perf_counter() - started, result.metrics)
    base = rows[0]["images_per_s"]
    print("\n| setup | images/s | vs local | fixed s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['images_per_s']:.0f} | {r['images_per_s'] / base:.2f}× | {r['fixed_s']:.1f} |")
    args.output.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
