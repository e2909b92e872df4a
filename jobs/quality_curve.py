"""Time-to-quality: judge every checkpoint of a local run and report prompt accuracy and classifier-FID against
training time, as a table, a JSON file and (with tracking) a plot in the run's MLflow experiment.

    python jobs/quality_curve.py --run-dir runs/NAME --num-samples 500
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

import json

import torch

from sd3ray.checkpoint import list_checkpoints, load_checkpoint
from sd3ray.cli import job_parser, positive_int, run_job
from sd3ray.data.format import read_split
from sd3ray.evaluation.figures import line_plot
from sd3ray.evaluation.judge import Reference, judge_settings, load_judge
from sd3ray.model import Denoiser
from sd3ray.training.context import default_device


def main() -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--run-dir", type=Path, required=True, help="a local run: RUN_DIR/checkpoints/step_*")
    parser.add_argument("--num-samples", type=positive_int, default=500)
    parser.add_argument("--output", type=Path, help="where to write curve.json/curve.png (default: RUN_DIR)")
    args = parser.parse_args()
    checkpoints = list_checkpoints(args.run_dir / "checkpoints")
    if not checkpoints:
        parser.error(f"no checkpoints under {args.run_dir}/checkpoints")
    device = default_device()
    first = load_checkpoint(checkpoints[0])
    train, test = read_split(first.config.data.parquet_dir, "train"), read_split(first.config.data.parquet_dir, "test")
    reference = Reference(load_judge(train, device), train, test)
    rows = []
    for path in checkpoints:
        data = load_checkpoint(path, map_location=device)
        model = Denoiser(data.config).to(device)
        model.load_state_dict(data.ema)
        model.eval().requires_grad_(False)
        seconds = data.meta.get("train_seconds", float("nan"))  # recorded by every checkpoint since format 1
        (row,) = judge_settings(model, data.config, reference, [data.config.sample.guidance],
                                   [data.config.sample.steps], args.num_samples)
        rows.append({"step": data.step, "train_minutes": seconds / 60, **row})
    print("| step | train min | prompt acc | cFID | floor | cFID/floor |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['train_minutes']:.1f} | {r['samples/accuracy']:.3f} | {r['val/cfid']:.2f} | "
              f"{r['val/cfid_floor']:.2f} | {r['samples/cfid_ratio']:.2f} |")
    out = args.output or args.run_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps(rows, indent=2))
    minutes = [r["train_minutes"] for r in rows]
    plot = line_plot({"prompt accuracy": (minutes, [r["samples/accuracy"] for r in rows])},
                     "training minutes", "prompt accuracy", f"{args.run_dir.name} ({args.num_samples} samples)")
    from PIL import Image

    Image.fromarray(plot).save(out / "curve.png")
    print(f"wrote {out / 'curve.json'} and {out / 'curve.png'}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_job(main)
