"""The training step's speed on this device, by compilation and precision: the library's own `train_step` (text
encoder, MM-DiT, loss, backward, clip, fused AdamW, scheduler, EMA) on the config's real batches.

    python -m benchmarks.step_speed --config configs/mnist_tiny.yaml --data-root ../shared/data

For each variant it reports the seconds of the first `--warmup` steps (compilation happens there; inductor's
on-disk cache makes a second run's much shorter) and the steady images/s, timed step by step in alternation
(A B C A B C ...) over `--iters` rounds so that the machine's drift falls on every variant alike. Within a
wall-clock budget, compiling pays only when the steps it speeds up repay the seconds it costs.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from benchmarks.speed import interleaved_seconds
from sd3ray.config import Config, load_config
from sd3ray.data.batches import TrainingBatches
from sd3ray.data.format import ImageSet, read_split
from sd3ray.data.prepare import prepare_dataset
from sd3ray.training.machine import describe_machine
from sd3ray.training.step import StepSettings, build_train_state, train_step

MODES = ("none", "blocks", "whole")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


class StepRunner:
    """One variant's state and batches, stepping on from where it stopped at each call."""

    def __init__(self, cfg: Config, train_set: ImageSet, mode: str, precision: str, device: torch.device) -> None:
        torch.manual_seed(cfg.train.seed)  # every variant starts from the same weights and sees the same batches
        self.batches = TrainingBatches(train_set, cfg, 0, 1, device)
        settings = StepSettings(PRECISIONS[precision], mode, f"{mode}/{precision}")
        self.state = build_train_state(cfg, device, settings)
        self.step = 0
        self.loss = torch.zeros(())

    def __call__(self) -> None:
        self.loss, _ = train_step(self.state, *self.batches.get(self.step), self.step)
        self.step += 1


def measure(cfg: Config, train_set: ImageSet, variants: list[tuple[str, str]], warmup: int, iters: int,
            device: torch.device) -> list[dict[str, Any]]:
    runners, first = {}, {}
    for mode, precision in variants:
        started = time.perf_counter()
        runner = runners[f"{mode}/{precision}"] = StepRunner(cfg, train_set, mode, precision, device)
        for _ in range(warmup):
            runner()
        runner.loss.item()
        first[f"{mode}/{precision}"] = time.perf_counter() - started
    seconds = interleaved_seconds(runners, device, warmup=0, iters=iters)
    return [{"variant": key, "compile": key.split("/")[0], "precision": key.split("/")[1],
             "first_steps_s": first[key], "images_per_s": cfg.train.batch_size / seconds[key],
             "loss": float(runners[key].loss)} for key in runners]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-root", help="folder holding MNIST/raw (data.raw_root)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"train.compile values, a subset of {MODES}")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    extra = [f"data.raw_root={args.data_root}"] if args.data_root else []
    cfg = load_config(args.config, [*args.overrides, *extra])
    prepare_dataset(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_set = read_split(cfg.data.parquet_dir, "train")  # once: every variant trains on the same arrays
    variants = [(m.strip(), p.strip()) for m in args.modes.split(",") for p in args.precisions.split(",")]
    rows = measure(cfg, train_set, variants, args.warmup, args.iters, device)
    base = rows[0]["images_per_s"]
    print(f"{describe_machine(device)}\n{args.config}, batch {cfg.train.batch_size}, {args.iters} interleaved rounds\n")
    print(f"| compile | precision | first {args.warmup} steps (s) | images/s | vs {rows[0]['variant']} |\n"
          "|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['compile']} | {r['precision']} | {r['first_steps_s']:.1f} | {r['images_per_s']:.0f} | "
              f"{r['images_per_s'] / base:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
