"""What torch.compile costs and gains for a config's whole training step (text encoder, MM-DiT, loss, backward,
fused AdamW, EMA) on this device: the seconds of the first steps, compilation included, and the steady images/s,
for eager, block-by-block compilation (`train.compile=true`) and the whole denoiser compiled.

    python -m benchmarks.compile_cost --config configs/mnist_tiny.yaml --data-root ../shared/data

Within a wall-clock budget, compiling pays only when the steps it speeds up repay the seconds it costs.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from sd3ray.config import load_config
from sd3ray.data import ImageSet, prepare_dataset, read_split
from sd3ray.ema import EMA
from sd3ray.flow import flow_loss
from sd3ray.model import Denoiser
from sd3ray.train_loop import TrainingBatches, adamw

MODES = ("eager", "blocks", "whole")


def time_mode(cfg, train_set: ImageSet, mode: str, warmup: int, iters: int, device: torch.device) -> dict[str, float]:
    """First `warmup` steps (compilation happens there) and the next `iters`, each timed as a whole."""
    torch.manual_seed(0)
    batches = TrainingBatches(train_set, cfg, 0, 1, device)
    model = Denoiser(cfg).to(device)
    ema, optimizer = EMA(model, cfg.train.ema_decay), adamw(model, device, lr=cfg.train.lr)
    started = time.perf_counter()
    if mode == "blocks":
        for block in model.mmdit.blocks:
            block.compile()
    net = torch.compile(model) if mode == "whole" else model

    def step(i: int) -> None:
        x0, ids, mask, t, eps = batches.get(i)
        flow_loss(partial(net, ids=ids, mask=mask), x0, eps, t).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, i)

    for i in range(warmup):
        step(i)
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(warmup, warmup + iters):
        step(i)
    per_step = (time.perf_counter() - started) / iters
    return {"mode": mode, "first_steps_s": first_s, "images_per_s": cfg.train.batch_size / per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist_tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-root", help="folder holding MNIST/raw (data.raw_root)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    extra = [f"data.raw_root={args.data_root}"] if args.data_root else []
    cfg = load_config(args.config, [*args.overrides, *extra])
    prepare_dataset(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_set = read_split(cfg.data.parquet_dir, "train")  # once: every mode trains on the same arrays
    rows = [time_mode(cfg, train_set, mode.strip(), args.warmup, args.iters, device)
            for mode in args.modes.split(",")]
    eager = next((r for r in rows if r["mode"] == "eager"), None)
    print(f"| mode | first {args.warmup} steps (s) | images/s | vs eager |\n|---|---|---|---|")
    for r in rows:
        ratio = f"{r['images_per_s'] / eager['images_per_s']:.2f}×" if eager else "-"
        print(f"| {r['mode']} | {r['first_steps_s']:.2f} | {r['images_per_s']:.0f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
