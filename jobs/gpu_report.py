"""The GPU report in one command: bf16 training step against eager and compiled diffusers, MFU at the largest batch
that fits, and the default model's time to quality, written to one report (JSON + markdown) as each part ends.
With `--levers FILE` it also compares levers (learning rate, schedule, EMA, width...) per optimizer step; with
`--study FILE` it runs a sweep file's trials one after another and writes the study's table (no Ray needed).

    python jobs/gpu_report.py --output gpu_report.json                       # speed, mfu and quality
    python jobs/gpu_report.py --parts quality --minutes 5 --data-root DIR     # one part
    python jobs/gpu_report.py --parts levers --levers benchmarks/levers_mnist_tiny.yaml
    python jobs/gpu_report.py --parts study --study configs/sweeps/sd3_timesteps.yaml   # SD3's timestep study

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

from benchmarks.gpu_report import (
    Report,
    largest_batch_section,
    levers_section,
    quality_section,
    read_lever_plan,
    speed_section,
    study_section,
)
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
from sd3ray.sweeps.spec import load_sweep
from sd3ray.training.context import default_device

PARTS = ("speed", "mfu", "quality", "levers", "study")
DEFAULT_PARTS = ("speed", "mfu", "quality")


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = job_parser(__doc__)
    add_config_args(parser)
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} (default {','.join(DEFAULT_PARTS)})")
    parser.add_argument("--batch", type=positive_int, default=256, help="batch of the speed comparison")
    parser.add_argument("--max-batch", type=positive_int, default=8192, help="largest batch the MFU search tries")
    parser.add_argument("--iters", type=positive_int, default=10, help="timed steps per candidate")
    parser.add_argument("--no-compile", action="store_true", help="speed and mfu: eager steps only")
    parser.add_argument("--minutes", type=non_negative_float, default=5.0, help="quality: wall-clock budget")
    parser.add_argument("--judge-guidance", type=guidance_list, default=[],
                        help="quality: also judge the final weights at these guidances, e.g. 2,3,4")
    parser.add_argument("--levers", type=Path, help="levers: a levers file (see benchmarks/levers_mnist_tiny.yaml)")
    parser.add_argument("--levers-minutes", type=non_negative_float, default=0.0,
                        help="levers: start no lever after this many minutes (0: run them all)")
    parser.add_argument("--study", type=Path, help="study: a sweep file with seeds (configs/sweeps/sd3_timesteps.yaml)")
    parser.add_argument("--study-minutes", type=non_negative_float, default=0.0,
                        help="study: start no trial after this many minutes (0: run them all)")
    add_data_args(parser)
    parser.add_argument("--device", choices=["cuda", "cpu"])
    parser.add_argument("--output", type=Path, default=Path("gpu_report.json"), help="JSON; markdown beside it")
    args = parser.parse_args()
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := sorted(set(args.parts) - set(PARTS)):
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if "levers" in args.parts and args.levers is None:
        parser.error("--parts levers needs --levers FILE (e.g. benchmarks/levers_mnist_tiny.yaml)")
    if "study" in args.parts and args.study is None:
        parser.error("--parts study needs --study FILE (e.g. configs/sweeps/sd3_timesteps.yaml)")
    return parser, args


def guidance_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 2,3,4, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"guidance must be >= 0, got {text!r}")
    return values


def main() -> int:
    parser, args = parse_args()
    cfg = config_from_args(parser, args, data_overrides(args))
    plan = read_lever_plan(args.levers) if "levers" in args.parts else None  # a bad file fails before any work
    study = load_sweep(args.study, [], data_overrides(args)) if "study" in args.parts else None
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
        report.add("mfu", largest_batch_section(cfg, device, args.batch, args.max_batch, args.iters,
                                                "none" if args.no_compile else "whole"))
    if "quality" in args.parts:
        report.add("quality", quality_section(cfg, args.minutes, device, args.judge_guidance))
    if plan is not None:
        report.add("levers", levers_section(plan, device, data_overrides(args), args.levers_minutes,
                                            on_lever=lambda section: report.add("levers", section)))
    if study is not None:
        report.add("study", study_section(study, device, max_minutes=args.study_minutes,
                                          on_trial=lambda section: report.add("study", section)))
    print("\n" + args.output.with_suffix(".md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    run_job(main)
