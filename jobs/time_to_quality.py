"""Time to quality: train a config for each wall-clock budget exactly as a user would (a fresh
`jobs/train.py --local` process per budget, timed from launch to the final checkpoint), then judge each final
checkpoint at the config's own sampler settings. Prints a table, writes it with a JSON file, and logs both, the
figures and every budget's sample grid to MLflow as a run of its own.

    python jobs/time_to_quality.py --config configs/mnist_tiny.yaml --minutes 5 10 --num-samples 1000
    python jobs/time_to_quality.py --minutes 10 --setup base --setup lr2e-3 train.lr=2e-3   # compare levers
    python jobs/time_to_quality.py --steps 2000 --setup base --setup ema0.98 train.ema_decay=0.98  # per image
    python jobs/time_to_quality.py --steps 2000 --seeds 3 --setup base --setup ema0.98 train.ema_decay=0.98

With `--steps`, each setup trains exactly that many optimizer steps instead of a wall-clock budget: quality per
image seen, which does not depend on the machine (the wall time is reported beside it). With `--seeds K`, each
setup and budget trains K times (train.seed 0..K−1) and a second table gives the mean ± standard deviation over the
seeds: a lever counts only where its gain exceeds that spread.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

import json

import torch

from sd3ray.cli import add_tracking_args, job_parser, positive_int, run_job
from sd3ray.config import load_config


def build_parser():
    parser = job_parser(__doc__)
    parser.add_argument("--config", default="configs/mnist_tiny.yaml", help="YAML config (default %(default)s)")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0, 10.0], help="wall-clock budgets")
    parser.add_argument("--steps", type=positive_int, nargs="+",
                        help="fixed optimizer-step budgets instead of --minutes (quality per image seen)")
    parser.add_argument("--setup", nargs="+", action="append", metavar=("LABEL", "KEY=VALUE"),
                        help="a named set of overrides to measure (repeatable; default: the config as shipped)")
    parser.add_argument("--num-samples", type=positive_int, default=1000, help="judged samples per checkpoint")
    parser.add_argument("--seeds", type=positive_int, default=1,
                        help="train each setup and budget with train.seed 0..SEEDS-1, and report mean ± std")
    parser.add_argument("--reserve-s", type=float, default=0.0,
                        help="seconds of each budget not given to the run (its budget already counts start-up "
                             "and the final checkpoint)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/time_to_quality"))
    add_tracking_args(parser)
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    setups = args.setup or [["shipped"]]
    for _label, *overrides in setups:
        load_config(args.config, overrides)  # a typo fails now, not after the first budget's training
    budgets = [(0.0, steps) for steps in args.steps] if args.steps else [(m, None) for m in args.minutes]
    if args.reserve_s < 0 or (not args.steps and min(args.minutes) * 60 <= args.reserve_s):
        parser.error(f"--reserve-s must be >= 0 and every budget longer than it ({args.reserve_s:g} s)")

    from benchmarks.time_to_quality import (
        judge_checkpoint,
        markdown_table,
        seed_summary,
        summary_table,
        train_for,
        ttq_metrics,
    )
    from sd3ray.data.format import read_split
    from sd3ray.evaluation.judge import Reference, load_judge
    from sd3ray.training.context import default_device

    device, reference = default_device(), None
    rows, grids = [], {}
    seeds = list(range(args.seeds)) if args.seeds > 1 else [None]  # one run keeps the config's own seed
    for label, *overrides in setups:
        for minutes, steps in budgets:
            for seed in seeds:
                seeded = [*overrides, f"train.seed={seed}"] if seed is not None else overrides
                run_label = f"{label}-seed{seed}" if seed is not None else label
                checkpoint, wall_s = train_for(args.config, minutes, args.reserve_s, args.output_dir, seeded,
                                               run_label, steps)
                if reference is None:  # the first run prepared the data; judging is off the clock
                    cfg = load_config(args.config, overrides)
                    train, test = (read_split(cfg.data.parquet_dir, split) for split in ("train", "test"))
                    reference = Reference(load_judge(train, device), train, test)
                with torch.no_grad():
                    row, grids[f"{run_label}_{steps}steps" if steps else f"{run_label}_{minutes:g}min"] = \
                        judge_checkpoint(checkpoint, reference, args.num_samples, device)
                rows.append({"label": label, "seed": seed, "overrides": seeded, "budget_minutes": minutes,
                             "budget_steps": steps, "wall_minutes": wall_s / 60, "checkpoint": str(checkpoint),
                             **row})
                print(markdown_table(rows[-1:]), flush=True)
    table = markdown_table(rows)
    if args.seeds > 1:
        table += "\nOver the seeds:\n\n" + summary_table(seed_summary(rows))
    from sd3ray.training.machine import describe_machine

    report = (f"{describe_machine(device)}\n{args.config}, {args.num_samples} samples per checkpoint\n\n"
              f"$ python {' '.join(sys.argv)}\n\n{table}")
    print(f"\n{report}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "time_to_quality.md").write_text(report)
    (args.output_dir / "time_to_quality.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.output_dir / 'time_to_quality.md'} and .json")
    if not args.no_tracking:
        from sd3ray.tracking.mlflow_tracker import make_tracker

        cfg = load_config(args.config, [f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else [])
        tracker = make_tracker(cfg)
        tracker.start(cfg, None, tags={"sd3ray.kind": "benchmark"}, run_name="time-to-quality")
        tracker.log_metrics(ttq_metrics(rows), 0)
        for key, grid in grids.items():
            tracker.log_image(f"samples_{key}", grid, 0)
        for name in ("time_to_quality.md", "time_to_quality.json"):
            tracker.log_artifact(args.output_dir / name, "time_to_quality")
        tracker.finish("FINISHED")
    return 0


if __name__ == "__main__":
    run_job(main)
