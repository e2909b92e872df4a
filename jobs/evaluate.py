"""Judge a checkpoint over a grid of guidance scales and sampler steps; print a table, log it and a plot to MLflow.

    python jobs/evaluate.py --checkpoint runs/NAME/checkpoints/step_00003000 --guidance 1 2 4 --steps 10 25 50
    python jobs/evaluate.py --checkpoint models:/sd3ray-mnist/3 --guidance 2 --steps 25 --promote champion

With a registered model version (models:/NAME/VERSION), the scores at the run's own sampler setting (else the
first setting judged) are recorded as tags of that version, and --promote ALIAS points the alias at it when it
beats the version the alias points to now (higher prompt accuracy, then lower classifier-FID ratio, judged at the
same setting).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

import json
import tempfile

import torch

from sd3ray.cli import add_guidance_args, add_tracking_args, job_parser, non_negative_float, positive_int, run_job
from sd3ray.data.format import read_split
from sd3ray.evaluation.figures import line_plot
from sd3ray.evaluation.judge import (
    Reference,
    is_judge_metric,
    judge_settings,
    load_judge,
    log_judged_settings,
    markdown_table,
)
from sd3ray.inference import load_ema_model, with_guidance
from sd3ray.training.context import default_device


def main() -> int:
    parser = job_parser(__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (a folder or a URI such as s3://...), MLflow run id, or "
                             "registered model version (models:/NAME/VERSION, models:/NAME@ALIAS)")
    parser.add_argument("--promote", metavar="ALIAS",
                        help="move ALIAS (e.g. champion) to this model version if it beats the current holder")
    parser.add_argument("--guidance", type=non_negative_float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--num-samples", type=positive_int, default=1000, help="judged samples per setting")
    add_guidance_args(parser)
    parser.add_argument("--sampler", choices=["euler", "heun"])
    parser.add_argument("--parquet-dir", help="real digits for the judge (default: the run's data.parquet_dir)")
    parser.add_argument("--device", choices=["cuda", "cpu"])
    add_tracking_args(parser)
    parser.add_argument("--output", type=Path, help="also write results.md/results.json here")
    args = parser.parse_args()
    if args.promote and not args.checkpoint.startswith("models:/"):
        parser.error("--promote needs a registered model version: --checkpoint models:/NAME/VERSION")

    device = torch.device(args.device) if args.device else default_device()
    model, cfg, step = load_ema_model(args.checkpoint, device, args.tracking_uri)
    cfg = with_guidance(cfg, args.guidance_interval, args.guide, args.shift)
    parquet = args.parquet_dir or cfg.data.parquet_dir
    train, test = read_split(parquet, "train"), read_split(parquet, "test")
    reference = Reference(load_judge(train, device), train, test)
    rows = judge_settings(model, cfg, reference, args.guidance, args.steps, args.num_samples, args.sampler)
    table = markdown_table(rows)
    print(f"\ncheckpoint step {step}, {args.num_samples} samples per setting\n\n{table}")
    series = {f"{s} steps": ([r["guidance"] for r in rows if r["steps"] == s],
                             [r["samples/accuracy"] for r in rows if r["steps"] == s]) for s in args.steps}
    plot = line_plot(series, "guidance scale", "prompt accuracy", f"step {step}")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table + "\n")
        (out / "results.json").write_text(json.dumps(rows, indent=2))
        if not args.no_tracking:
            from sd3ray.tracking.mlflow_tracker import make_tracker

            tracker = make_tracker(cfg, uri=args.tracking_uri or None)
            run_id = log_judged_settings(tracker, cfg, args.checkpoint, step, rows, plot, out)
            print(f"logged to MLflow run {run_id}")
    if args.checkpoint.startswith("models:/"):
        record_on_model_version(args.checkpoint, args.tracking_uri, cfg, rows, args.num_samples,
                                args.sampler or cfg.sample.sampler, args.promote)
    return 0


def record_on_model_version(model_uri: str, tracking_uri: str, cfg, rows: list[dict], num_samples: int,
                            sampler: str, alias: str | None) -> None:
    from mlflow.tracking import MlflowClient

    from sd3ray.storage import resolve_tracking_uri
    from sd3ray.tracking.registry import model_version, promote_if_better, record_scores

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    name, version = model_version(client, model_uri)
    shipped = [r for r in rows if r["guidance"] == cfg.sample.guidance and r["steps"] == cfg.sample.steps]
    row = (shipped or rows)[0]
    setting = f"guidance {row['guidance']:g}, {row['steps']} {sampler} steps, {num_samples} samples"
    record_scores(client, name, version, {k: v for k, v in row.items() if is_judge_metric(k)}, setting)
    print(f"recorded on {name} version {version}: prompt accuracy {row['samples/accuracy']:.3f} ({setting})")
    if alias:
        moved, before = promote_if_better(client, name, version, alias)
        print(f"{alias}: {'now' if moved else 'stays'} {name} version {version if moved else before}"
              + (f" (was {before})" if moved and before else ""))


if __name__ == "__main__":
    run_job(main)
