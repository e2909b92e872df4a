"""Speed benchmark: sd3ray's MM-DiT training step vs diffusers' SD3Transformer2DModel at the same dimensions,
sampling throughput, the data path, MFU on GPU and (optionally) Ray Train against local mode. Prints a markdown
table, writes it and a JSON beside --output, and logs the figures, a chart and both files to MLflow.

    python jobs/benchmark.py --config configs/mnist.yaml --batch 64                  # CPU, eager fp32
    python jobs/benchmark.py --config configs/mnist.yaml --batch 256 --compile       # GPU: bf16, + torch.compile
    python jobs/benchmark.py --ray-overhead configs/mnist_tiny.yaml --skip-models    # Ray Train vs local mode only
    python jobs/benchmark.py --ray-overhead configs/mnist_tiny.yaml --skip-models --ray-interleaved 3  # A B A B

diffusers comes with the `bench` extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

import argparse
import importlib.util
import json
import tempfile

import torch

from benchmarks.ray_overhead import (
    interleaved_markdown,
    interleaved_ray_rows,
    ray_overhead_config,
    ray_overhead_rows,
    ray_setups,
    stream_read_markdown,
    stream_read_rows,
)
from benchmarks.report import benchmark_metrics, log_benchmark, markdown_report, row_key
from benchmarks.speed import H100_BF16_DENSE_TFLOPS, data_path_row, full_step_tflop, mfu, model_step_rows, sampling_row
from sd3ray.cli import add_config_args, add_tracking_args, config_from_args, job_parser, positive_int, run_job
from sd3ray.config import ConfigError, load_config
from sd3ray.training.context import default_device


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = job_parser(__doc__)
    add_config_args(parser)
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--context-len", type=positive_int, default=20, help="text tokens (MNIST prompts: <= 20)")
    parser.add_argument("--device", choices=["cuda", "cpu"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=positive_int, default=3, help="timed steps per model, in alternation")
    parser.add_argument("--sampling-images", type=int, default=64, help="0 skips the sampling figure")
    parser.add_argument("--no-data", action="store_true", help="skip the data-path figure")
    parser.add_argument("--skip-models", action="store_true", help="skip model, sampling and data timing")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="for MFU (GPU only)")
    parser.add_argument("--ray-overhead", metavar="CONFIG", type=Path,
                        help="also train CONFIG locally and on Ray workers (1×all CPUs, 1×1, 2×1, 1×1 streamed by "
                             "Ray Data), and time Ray Data's read path alone on 1..all CPUs (needs ray)")
    parser.add_argument("--ray-overhead-steps", type=positive_int, default=400)
    parser.add_argument("--ray-interleaved", type=positive_int, default=0, metavar="N",
                        help="with --ray-overhead: instead of its table of setups, run local mode and one Ray "
                             "worker with as many CPUs alternately N times (the ratio that drift cannot bias)")
    add_tracking_args(parser)
    parser.add_argument("--output", type=Path, default=Path("benchmark.json"), help="JSON; the table goes beside it")
    return parser, parser.parse_args()


def main() -> int:
    parser, args = parse_args()
    cfg = config_from_args(parser, args, [f"train.batch_size={args.batch}"])
    if not args.no_tracking and importlib.util.find_spec("mlflow") is None:
        parser.error("mlflow is not installed: pip install mlflow-skinny, or pass --no-tracking")
    ray_cfg = None
    if args.ray_overhead:  # checked before the minutes of model timing, not after
        if importlib.util.find_spec("ray") is None:
            parser.error("--ray-overhead needs Ray: pip install 'ray[train]'")
        try:
            ray_base = load_config(args.ray_overhead)
        except ConfigError as err:
            parser.error(f"--ray-overhead: {err}")
        ray_cfg = ray_overhead_config(ray_base, args.ray_overhead_steps, tempfile.mkdtemp(prefix="sd3ray-bench-"))
    device = torch.device(args.device) if args.device else default_device()
    bf16 = device.type == "cuda"
    rows, extras, ray_rows, stream_rows, interleaved_rows = [], [], [], [], []
    if not args.skip_models:
        with_diffusers = importlib.util.find_spec("diffusers") is not None
        if not with_diffusers:
            print("diffusers is not installed (pip install -e '.[bench]'): timing sd3ray alone")
        rows = model_step_rows(cfg, args.batch, args.context_len, device, bf16, args.compile, args.warmup,
                               args.iters, with_diffusers)
        for r in rows:
            r["mfu"] = mfu(cfg, args.batch, args.context_len, r["seconds_per_step"], args.peak_tflops) if bf16 else None
        if args.sampling_images:
            extras.append(sampling_row(cfg, device, args.sampling_images, cfg.sample.steps, cfg.sample.guidance, bf16))
        if not args.no_data:
            extras.append(data_path_row(cfg, device))
    if ray_cfg is not None:
        if args.ray_interleaved:
            interleaved_rows = interleaved_ray_rows(ray_cfg, args.ray_interleaved)
        else:
            ray_rows = ray_overhead_rows(ray_cfg, ray_setups(torch.get_num_threads()), local_beside_cluster=True)
            stream_rows = stream_read_rows(ray_cfg, list(range(1, torch.get_num_threads() + 1)))
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    precision = "bf16 autocast" if bf16 else "fp32"
    report = markdown_report(f"{name}, {precision}, batch {args.batch}, config {args.config}", rows, extras, ray_rows)
    report += stream_read_markdown(stream_rows) if stream_rows else ""
    report += interleaved_markdown(interleaved_rows, torch.get_num_threads()) if interleaved_rows else ""
    print(f"\n{report}full sd3ray step (MM-DiT + text encoder): "
          f"{full_step_tflop(cfg, args.batch, args.context_len):.3f} TFLOP")
    summary = {"device": name, "precision": precision, "batch": args.batch, "config": str(args.config),
               "rows": rows, "extra": extras, "ray_overhead": ray_rows, "stream_read": stream_rows,
               "ray_interleaved": interleaved_rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(summary, indent=2))
    args.output.with_suffix(".md").write_text(report)
    if not args.no_tracking:
        from sd3ray.evaluation.figures import bar_plot
        from sd3ray.tracking.mlflow_tracker import make_tracker

        bars = {row_key(r): r["images_per_s"] for r in rows} or {r["setup"]: r["images_per_s"] for r in ray_rows}
        chart = bar_plot(bars, "training images/s", f"{name}, {precision}, batch {args.batch}")
        tags = {"sd3ray.device": name, "sd3ray.precision": precision, "sd3ray.torch_version": torch.__version__}
        run_id = log_benchmark(make_tracker(cfg, uri=args.tracking_uri or None), cfg, f"benchmark-b{args.batch}", tags,
                               {**benchmark_metrics(rows, extras, ray_rows),
                                **{f"bench/stream_read_{r['data_cpus']}cpu/images_per_s": r["rows_per_s"]
                                   for r in stream_rows}}, chart,
                               [args.output, args.output.with_suffix(".md")])
        print(f"logged to MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    run_job(main)
