"""Sample images from a trained model with classifier-free guidance.

    python jobs/sample.py --checkpoint runs/NAME/checkpoints/step_00003000 --prompt 7 --prompt seven --output out/
    python jobs/sample.py --checkpoint MLFLOW_RUN_ID --prompts-file prompts.txt --guidance 3 --steps 50

Writes OUTPUT/grid.png (one row per prompt), OUTPUT/prompts.txt and OUTPUT/samples.npz
(images: uint8 N×C×H×W, prompts: N strings). The same seed gives the same images.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

import argparse

import numpy as np
import torch

from sd3ray.cli import add_guidance_args, add_tracking_args, job_parser, non_negative_float, positive_int, run_job
from sd3ray.evaluation.figures import make_grid, save_png
from sd3ray.inference import drawing_size, generate, load_ema_model, with_guidance
from sd3ray.storage import writable_folder
from sd3ray.training.context import default_device


def parse_args() -> argparse.Namespace:
    parser = job_parser(__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (a folder or a URI such as s3://...) or MLflow run id")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line")
    parser.add_argument("--num-samples", type=positive_int, default=8, help="samples per prompt (default 8)")
    parser.add_argument("--steps", type=positive_int, help="sampler steps (default: the run's sample.steps)")
    parser.add_argument("--sampler", choices=["euler", "heun"], help="ODE sampler (default: the run's)")
    parser.add_argument("--guidance", type=non_negative_float, help="CFG scale; 1 = no guidance (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", metavar="WxH", help="picture width x height, e.g. 48x32 (default: the model's "
                                                      "square; other shapes need SD3's position table)")
    add_guidance_args(parser)
    parser.add_argument("--output", type=Path, default=Path("samples"))
    parser.add_argument("--device", choices=["cuda", "cpu"])
    add_tracking_args(parser, writes=False)  # to find a checkpoint by MLflow run id
    args = parser.parse_args()
    if args.prompts_file:
        if not args.prompts_file.is_file():
            parser.error(f"--prompts-file {args.prompts_file} does not exist")
        try:
            text = args.prompts_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            parser.error(f"--prompts-file {args.prompts_file} is not UTF-8 text (byte {err.start} is "
                         f"{err.object[err.start]:#04x}); save it as UTF-8, one prompt per line")
        args.prompt += [line.strip() for line in text.splitlines() if line.strip()]
    if not args.prompt:
        parser.error("give at least one --prompt or a --prompts-file")
    return args


def main() -> int:
    args = parse_args()
    device = torch.device(args.device) if args.device else default_device()
    model, cfg, step = load_ema_model(args.checkpoint, device, args.tracking_uri)
    cfg = with_guidance(cfg, args.guidance_interval, args.guide, args.shift)
    prompts = [p for p in args.prompt for _ in range(args.num_samples)]
    size = drawing_size(cfg, args.size) if args.size else None
    images = generate(model, prompts, cfg, args.seed, device, args.guidance, args.steps, args.sampler, size=size)
    writable_folder(args.output, "--output", "choose a folder you can write to")
    save_png(make_grid(images, nrow=args.num_samples), args.output / "grid.png", scale=2)
    (args.output / "prompts.txt").write_text("\n".join(prompts) + "\n")
    np.savez_compressed(args.output / "samples.npz", images=images.numpy(), prompts=np.array(prompts))
    print(f"wrote {len(prompts)} samples from step {step} to {args.output}/ (grid.png, prompts.txt, samples.npz)")
    return 0


if __name__ == "__main__":
    run_job(main)
