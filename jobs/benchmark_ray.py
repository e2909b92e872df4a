"""Ray Train overhead: steady-state images/s of --local vs Ray Train workers, with fixed costs reported apart.

    python jobs/benchmark_ray.py --config configs/mnist_tiny.yaml --steps 400

Runs the same config (1) in this process, (2) in this process again once the Ray cluster is up (its daemons share
the CPUs), (3) on 1 Ray worker with all the CPUs local mode uses, (4) on 1 worker with 1 CPU and (5) on 2 workers
with 1 CPU each. images/s is the rate over the second half of the run (warm-up excluded); "fixed" is wall time
minus steps at that rate: start-up, data loading, final evaluation and teardown.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

import argparse
import json
import tempfile

import torch

from sd3ray.benchmark import ray_overhead_config, ray_overhead_rows
from sd3ray.cli import add_config_args, config_from_args, positive_int


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default="configs/mnist_tiny.yaml")
    parser.add_argument("--steps", type=positive_int, default=400)
    parser.add_argument("--output", type=Path, default=Path("benchmark_ray.json"))
    args = parser.parse_args()
    cfg = ray_overhead_config(config_from_args(parser, args), args.steps, tempfile.mkdtemp(prefix="sd3ray-bench-"))
    threads = torch.get_num_threads()
    rows = ray_overhead_rows(cfg, [(f"ray 1 worker × {threads} CPU", 1, threads), ("ray 1 worker × 1 CPU", 1, 1),
                                   ("ray 2 workers × 1 CPU", 2, 1)], local_beside_cluster=True)
    print("\n| setup | images/s | vs local | fixed s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['images_per_s']:.0f} | {r['vs_local']:.2f}× | {r['fixed_s']:.1f} |")
    args.output.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
