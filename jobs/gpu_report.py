"""The GPU report in one command: bf16 training step against eager and compiled diffusers, MFU at the largest batch
that fits, and the default model's time to quality, written to one report (JSON + markdown) as each part ends.

    python jobs/gpu_report.py --output gpu_report.json                       # all three parts, default model
    python jobs/gpu_report.py --parts quality --minutes 5 --data-root DIR     # one part

Needs torch and sd3ray's own dependencies only (no ray or mlflow); diffusers (the `bench` extra) for its rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

import argparse
import importlib.util
import time

import torch

from benchmarks.gpu_report import Report, largest_batch_section, quality_section, speed_section
from sd3ray.cli import (
    add_config_args,
    add_data_args,
    config_from_args,
    data_overrides,
    job_parser,
    non_negative_float,
    positive_int,
    run_job,
)
from sd3ray.context import default_device

PARTS = ("speed", "mfu", "quality")


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = job_parser(__doc__)
    add_config_args(parser)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--batch", type=positive_int, default=256, help="batch of the speed comparison")
    parser.add_argument("--max-batch", type=positive_int, default=8192, help="largest batch the MFU search tries")
    parser.add_argument("--iters", type=positive_int, default=10, help="timed steps per candidate")
    parser.add_argument("--no-compile", action="store_true", help="speed: eager rows only")
    parser.add_argument("--minutes", type=non_negative_float, default=5.0, help="quality: wall-clock budget")
    add_data_args(parser)
    parser.add_argument("--device", choices=["cuda", "cpu"])
    parser.add_argument("--output", type=Path, default=Path("gpu_report.json"), help="JSON; markdown beside it")
    args = parser.parse_args()
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := sorted(set(args.parts) - set(PARTS)):
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return parser, args


def main() -> int:
    parser, args = parse_args()
    cfg = config_from_args(parser, args, data_overrides(args))
    device = torch.device(args.device) if args.device else default_device()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    report = Report(args.output, {"device": name, "precision": precision, "torch": torch.__version__,
                                  "config": args.config,
                                  "batch": args.batch, "date": time.strftime("%Y-%m-%d %H:%M %Z")})
    print(f"sd3ray GPU report on {name}: {', '.join(args.parts)} -> {args.output}", flush=True)
    context_len = 20  # MNIST prompts are at most 20 tokens with BOS
    if "speed" in args.parts:
        with_diffusers = importlib.util.find_spec("diffusers") is not None
        if not with_diffusers:
            print("diffusers is not installed (pip install -e '.[bench]'): timing sd3ray alone", flush=True)
        report.add("speed", speed_section(cfg, device, args.batch, context_len, with_diffusers,
                                          not args.no_compile, args.iters))
    if "mfu" in args.parts:
        report.add("mfu", largest_batch_section(cfg, device, args.batch, args.max_batch, context_len, args.iters))
    if "quality" in args.parts:
        report.add("quality", quality_section(cfg, args.minutes, device))
    print("\n" + args.output.with_suffix(".md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    run_job(main)
