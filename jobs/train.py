"""Train an MM-DiT. Default: Ray Train on N workers; --local: this process only (one GPU, or CPU).

    python jobs/train.py --local --config configs/mnist_tiny.yaml
    python jobs/train.py --workers 2 --cpu --config configs/mnist_tiny.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py --workers 2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

import argparse
import time
from dataclasses import replace

from sd3ray.cli import (
    add_config_args,
    add_data_args,
    add_tracking_args,
    check_run_inputs,
    config_from_args,
    data_overrides,
    job_parser,
    non_negative_float,
    positive_int,
    run_job,
    run_name,
)

GPU_CONFIG, CPU_CONFIG = "configs/mnist.yaml", "configs/mnist_tiny.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__)
    add_config_args(parser, default=None, default_help=f"{GPU_CONFIG} where there is a GPU, else {CPU_CONFIG}")
    parser.add_argument("--local", action="store_true", help="run in this process instead of on Ray workers")
    parser.add_argument("--name", type=run_name,
                        help="run name: checkpoints go to OUTPUT_DIR/NAME (default: config + time)")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue or extend the run --name names (latest), or, in local mode, continue from a "
                             "checkpoint folder (PATH); rerunning an interrupted run's command continues it too")
    add_data_args(parser)
    parser.add_argument("--steps", type=positive_int, help="training steps (sets train.steps)")
    parser.add_argument("--max-minutes", type=non_negative_float, help="wall-clock budget (sets train.max_minutes)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="local mode: force a device")
    add_tracking_args(parser)
    ray = parser.add_argument_group("Ray Train (default mode)")
    ray.add_argument("--workers", type=positive_int, default=1, help="number of training workers")
    accel = ray.add_mutually_exclusive_group()
    accel.add_argument("--gpu", action="store_true", help="one GPU per worker (default when the cluster has GPUs)")
    accel.add_argument("--cpu", action="store_true", help="CPU workers with gloo, even on a GPU cluster")
    ray.add_argument("--storage-path", help="where Ray stores checkpoints: a folder or a URI such as s3://bucket/x")
    ray.add_argument("--max-failures", type=int, default=0, help="restarts from the last checkpoint on failure")
    ray.add_argument("--cpus-per-worker", type=positive_int,
                     help="CPUs (and torch threads) per worker (default: CPU workers share the cluster's CPUs, "
                          "GPU workers take 1)")
    ray.add_argument("--placement", choices=["pack", "spread"], default="pack",
                     help="pack workers onto as few nodes as fit (default), or spread them one per node")
    return parser


def default_config(args: argparse.Namespace) -> str:
    """The 66M model where it trains at a useful speed (a GPU), the small one elsewhere; said in one line."""
    if args.local:
        import torch

        gpu = args.device != "cpu" and torch.cuda.is_available()
    else:
        from sd3ray.cluster.connect import cluster_gpus

        gpu = not args.cpu and cluster_gpus() >= 1
    if not gpu:
        print(f"sd3ray: no GPU {'here' if args.local else 'in the Ray cluster'}: training {CPU_CONFIG}, the CPU "
              f"config; --config {GPU_CONFIG} trains the 66M model", flush=True)
    return GPU_CONFIG if gpu else CPU_CONFIG


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    args.config = args.config or default_config(args)
    extra = data_overrides(args)
    extra += [f"train.steps={args.steps}"] if args.steps else []
    extra += [f"train.max_minutes={args.max_minutes}"] if args.max_minutes is not None else []
    cfg = config_from_args(parser, args, extra)
    name = args.name or f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not cfg.tracking.run_name:  # the MLflow run carries the run's name, not a random one
        cfg = replace(cfg, tracking=replace(cfg.tracking, run_name=name))
    check_run_inputs(cfg, tracking=not args.no_tracking)
    if args.local:
        from sd3ray.training.local import run_local

        run_local(cfg, args.name, name, args.resume, args.device, tracking=not args.no_tracking)
    else:
        if args.resume not in (None, "latest"):
            parser.error("under Ray, --resume takes latest (with --name): Ray storage keeps the run's checkpoints; "
                         "--resume PATH is for --local")
        if args.resume and not args.name:
            parser.error("--resume latest under Ray needs the --name of the run to continue")
        from sd3ray.cluster.trainer import run_ray

        run_ray(cfg, name, workers=args.workers, use_gpu=True if args.gpu else False if args.cpu else None,
                storage_path=args.storage_path, max_failures=args.max_failures, tracking=not args.no_tracking,
                cpus_per_worker=args.cpus_per_worker, placement=args.placement.upper(), resume=bool(args.resume))
    return 0


if __name__ == "__main__":
    run_job(main)
