"""Sweep model width and timestep-sampling scheme with Ray Tune; review the sweep in MLflow.

    python jobs/tune.py --config configs/tune_mnist.yaml
    python jobs/tune.py --config configs/tune_mnist.yaml --resume     # continue an interrupted sweep
    python jobs/tune.py --config configs/sweeps/sd3_timesteps.yaml    # SD3's timestep study, 7 schemes x 3 seeds
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir copy

import argparse

from sd3ray.cli import add_data_args, add_tracking_args, data_overrides, job_parser, run_job
from sd3ray.config import ConfigError
from sd3ray.sweeps.driver import run_sweep
from sd3ray.sweeps.spec import load_sweep


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser(__doc__)
    parser.add_argument("--config", default="configs/tune_mnist.yaml", help="sweep YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep value, e.g. --set name=my-sweep (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the sweep of the same name; finished "
                                                              "trials are not rerun")
    parser.add_argument("--trial-set", action="append", default=[], metavar="KEY=VALUE",
                        help="append a training config override to every trial, e.g. --trial-set train.steps=500")
    add_tracking_args(parser)
    add_data_args(parser)
    return parser


def main() -> int:
    parser = build_parser()
    args = parser.parse_args()
    try:
        spec = load_sweep(args.config, args.overrides, [*args.trial_set, *data_overrides(args)])
    except ConfigError as err:
        parser.error(str(err))
    rows = run_sweep(spec, resume=args.resume, tracking=not args.no_tracking)
    failed = sum(row["status"] == "failed" for row in rows)
    print(f"sd3ray: sweep '{spec.name}' done: {len(rows)} trials" + (f", {failed} failed" if failed else ""))
    return 0


if __name__ == "__main__":
    run_job(main)
