"""Speed benchmark: sd3ray's MM-DiT training step vs diffusers' SD3Transformer2DModel at the same dimensions,
sampling throughput, the data path, and MFU on GPU. Prints a markdown table and writes JSON.

    python jobs/benchmark.py --config configs/mnist.yaml --batch 64                  # CPU, eager fp32
    python jobs/benchmark.py --config configs/mnist.yaml --batch 256 --compile       # GPU: bf16, + torch.compile

diffusers comes with the `bench` extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

import argparse
import importlib.util
import json

import torch

from sd3ray.benchmark import H100_BF16_DENSE_TFLOPS, data_path_row, full_step_tflop, mfu, model_step_rows, sampling_row
from sd3ray.cli import add_config_args, config_from_args, positive_int
from sd3ray.context import default_device


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--context-len", type=positive_int, default=20, help="text tokens (MNIST prompts: <= 20)")
    parser.add_argument("--device", choices=["cuda", "cpu"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=positive_int, default=3)
    parser.add_argument("--sampling-images", type=int, default=64, help="0 skips the sampling figure")
    parser.add_argument("--no-data", action="store_true", help="skip the data-path figure")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="for MFU (GPU only)")
    parser.add_argument("--output", type=Path, default=Path("benchmark.json"))
    args = parser.parse_args()
    cfg = config_from_args(parser, args, [f"train.batch_size={args.batch}"])
    device = torch.device(args.device) if args.device else default_device()
    bf16 = device.type == "cuda"
    with_diffusers = importlib.util.find_spec("diffusers") is not None
    if not with_diffusers:
        print("diffusers is not installed (pip install -e '.[bench]'): timing sd3ray alone")
    rows = model_step_rows(cfg, args.batch, args.context_len, device, bf16, args.compile, args.warmup, args.iters,
                           with_diffusers)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{name}, {'bf16 autocast' if bf16 else 'fp32'}, batch {args.batch}, config {args.config}\n")
    print("| model | compiled | params (M) | images/s | vs diffusers eager | MFU |\n|---|---|---|---|---|---|")
    reference = next((r for r in rows if r["model"] == "diffusers" and not r["compiled"]), None)
    for r in rows:
        ratio = f"{r['images_per_s'] / reference['images_per_s']:.2f}×" if reference else "-"
        r["mfu"] = mfu(cfg, args.batch, args.context_len, r["seconds_per_step"], args.peak_tflops) if bf16 else None
        shown = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"| {r['model']} | {r['compiled']} | {r['params_m']:.1f} | {r['images_per_s']:.1f} | {ratio} | {shown} |")
    extra = []
    if args.sampling_images:
        extra.append(sampling_row(cfg, device, args.sampling_images, cfg.sample.steps, cfg.sample.guidance, bf16))
    if not args.no_data:
        extra.append(data_path_row(cfg, device))
    for row in extra:
        print(f"{row['what']}: {row['images_per_s']:.3g} images/s")
    print(f"full sd3ray step (MM-DiT + text encoder): {full_step_tflop(cfg, args.batch, args.context_len):.3f} TFLOP")
    args.output.write_text(json.dumps({"device": name, "batch": args.batch, "rows": rows, "extra": extra}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
