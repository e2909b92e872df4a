"""Peak memory per rank and step time under DDP, FSDP2 and FSDP2 + activation checkpointing, on 1 and 2 workers
(any other count through --variants, e.g. fsdp:4:blocks), running the library's own `train_step`; and the memory
model of `sd3ray.training.parallel` (bytes per parameter per rank) checked against the figures, then extrapolated
to SD3-sized models.

    python -m benchmarks.memory --config configs/mnist.yaml --data-root ../shared/data

Each variant starts fresh processes (gloo on CPU, NCCL on GPU) that load the data, then build the state and train
`--steps` steps after one untimed. Measured per rank:
  - peak: the most memory in use during the timed steps, less what was in use before the state was built (imports
    and data): on a GPU torch.cuda.max_memory_allocated; on a CPU the peak resident memory (VmHWM, reset after the
    untimed step). glibc is run with a fixed mmap threshold so that a freed tensor leaves the resident set, as it
    leaves a GPU's allocated bytes; what it still keeps makes the CPU figure an upper bound;
  - held: the training state this rank holds, counted from its tensors (its slices under FSDP): weights, EMA,
    AdamW moments, and gradients as large as the trained weights;
  - step time: the median over the timed steps of the slowest rank's step.
The threads are split between the workers (2 cores: one worker with 2 threads, or two with 1; more workers than
cores get one thread each and share the cores), so a row's step time is that of the same machine, not of more
hardware. Under FSDP the ranks build their state one at a time (`build_in_turn`), so that several ranks on one host
never each hold a whole model at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sd3ray.config import Config, from_dict, load_config, to_dict
from sd3ray.data.batches import TrainingBatches
from sd3ray.data.format import read_split
from sd3ray.data.prepare import prepare_dataset
from sd3ray.training.machine import describe_machine
from sd3ray.training.parallel import BYTES_ALL_PARAMS, BYTES_TRAINED_PARAMS, DDP_BUCKET_BYTES, is_dtensor, mmdit_blocks
from sd3ray.training.step import StepSettings, TrainState, build_train_state, train_step

# (train.parallel, workers, train.activation_checkpointing)
VARIANTS = [("ddp", 1, "none"), ("fsdp", 1, "none"), ("fsdp", 1, "blocks"),
            ("ddp", 2, "none"), ("fsdp", 2, "none"), ("fsdp", 2, "blocks")]
PER_PARAM = sum(BYTES_ALL_PARAMS.values()) + sum(BYTES_TRAINED_PARAMS.values())
# nominal MM-DiT sizes the extrapolation reads (parameters): SD3 Medium's 2B, SD3.5 Large's 8B
SD3_MODELS = {"SD3 Medium (2B)": 2.0e9, "SD3.5 Large (8B)": 8.0e9}
GPU_BYTES = 80e9
# a fixed threshold turns off glibc's growing one, under which freed tensors stay resident for reuse
MMAP_THRESHOLD = 1 << 20


def resident_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def in_use(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(device)
    return 1024 * resident_kib("VmRSS")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from the current resident size


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return 1024 * resident_kib("VmHWM")


def local_bytes(tensors) -> int:
    return sum((t.to_local() if is_dtensor(t) else t).numel() * t.element_size() for t in tensors)


def held_bytes(state) -> dict[str, int]:
    params = list(state.model.parameters())
    moments = [v for s in state.optimizer.state.values() for k, v in s.items() if k != "step"]
    return {"weights": local_bytes(params), "EMA": local_bytes(state.ema.model.parameters()),
            "gradients": local_bytes(p for p in params if p.requires_grad), "AdamW moments": local_bytes(moments)}


def build_in_turn(cfg: Config, device: torch.device, settings: StepSettings, rank: int,
                  world: int) -> TrainState:
    """The training state, built by one rank at a time under FSDP. Each rank builds the whole model and its EMA
    copy before sharding them (8 B/param, 12 on rank 0 with its unsharded EMA twin): built together, N ranks on one
    host would hold N whole models at once, more than the sharded steps that are measured. FSDP2's sharding runs no
    collective, so a rank can build while the others wait; DDP's broadcast of the weights is one, so DDP ranks
    build together. Built in turn or not, a rank's state is the same (same seed) and its peak is measured from the
    first timed step."""
    sharded = cfg.train.parallel == "fsdp" and world > 1
    state: TrainState | None = None
    for turn in range(world if sharded else 1):
        if not sharded or turn == rank:
            torch.manual_seed(cfg.train.seed)
            state = build_train_state(cfg, device, settings)
        if sharded:
            dist.barrier()
    assert state is not None
    return state


def run_rank(rank: int, world: int, port: int, cfg_dict: dict[str, Any], steps: int, threads: int,
             out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    cfg = from_dict(cfg_dict)
    batches = TrainingBatches(read_split(cfg.data.parquet_dir, "train"), cfg, rank, world, device)
    baseline = in_use(device)
    state = build_in_turn(cfg, device, StepSettings(torch.bfloat16 if cuda else None, "none", "benchmark"), rank,
                          world)
    seconds = []
    for step in range(steps + 1):
        if step == 1:
            reset_peak(device)  # the first step allocates the moments; the peak is the steps' from here on
        started = time.perf_counter()
        loss, _ = train_step(state, *batches.get(step), step)
        loss.item()
        took = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=device)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)  # a step is as slow as its slowest rank
        if step:
            seconds.append(float(took))
    row = {"rank": rank, "peak": peak_bytes(device) - baseline, "held": held_bytes(state),
           "step_s": statistics.median(seconds), "loss": float(loss), "plan": state.plan.reason}
    rows: list[Any] = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def measure(cfg: Config, parallel: str, workers: int, recompute: str, steps: int, scratch: Path) -> dict[str, Any]:
    import socket

    variant = replace(cfg, train=replace(cfg.train, parallel=parallel, activation_checkpointing=recompute))
    out = scratch / f"{parallel}-{workers}-{recompute}.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # read by glibc as each worker process starts
    mp.spawn(run_rank, args=(workers, port, to_dict(variant), steps, threads, str(out)), nprocs=workers, join=True)
    ranks = json.loads(out.read_text())
    return {"parallel": parallel, "workers": workers, "recompute": recompute, "ranks": ranks,
            "peak": max(r["peak"] for r in ranks), "held": max(sum(r["held"].values()) for r in ranks),
            "step_s": ranks[0]["step_s"], "plan": ranks[0]["plan"]}


def model_figures(cfg: Config) -> dict[str, float]:
    """Parameters, and the largest MM-DiT block's: what FSDP gathers whole while that block runs."""
    from sd3ray.model import Denoiser

    with torch.device("meta"):  # shapes only: a 500M model's weights are not allocated to be counted
        model = Denoiser(cfg)
    blocks = mmdit_blocks(model) or []
    return {"params": sum(p.numel() for p in model.parameters()),
            "block_params": max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)}


def predicted_held(params: float, workers: int, sharded: bool) -> float:
    return PER_PARAM * params / (workers if sharded else 1)


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def report(rows: list[dict[str, Any]], figures: dict[str, float], cfg_name: str, batch: int, steps: int,
           device: torch.device) -> str:
    p, block = figures["params"], figures["block_params"]
    lines = [describe_machine(device), f"{cfg_name}, batch {batch} per worker, {p / 1e6:.1f}M parameters, "
             f"median of {steps} steps", "",
             "| parallel | workers | activation checkpointing | held (MiB, counted) | model: 20 B/param/N (MiB) | "
             "peak per rank (MiB) | peak - held (MiB) | step (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sharded = r["parallel"] == "fsdp"
        lines.append(f"| {r['parallel']} | {r['workers']} | {r['recompute']} | {mib(r['held'])} | "
                     f"{mib(predicted_held(p, r['workers'], sharded))} | {mib(r['peak'])} | "
                     f"{mib(r['peak'] - r['held'])} | {r['step_s']:.2f} |")
    lines += ["", f"FSDP's transient per rank (model): the largest block gathered, {block / 1e6:.2f}M parameters "
              f"x (4 B weights + 4 B gradients) = {mib(8 * block)} MiB", "",
              "Extrapolated (the model, not measured): training state per rank, fp32 master weights, 8 x 80 GB",
              "", "| model | DDP over 8, with its buckets (GB/rank) | FSDP over 8 (GB/rank) | "
              "DDP fits 80 GB with half for activations? |", "|---|---|---|---|"]
    for name, n in SD3_MODELS.items():
        ddp, fsdp = predicted_held(n, 1, False) + DDP_BUCKET_BYTES * n, predicted_held(n, 8, True)
        lines.append(f"| {name} | {ddp / 1e9:.0f} | {fsdp / 1e9:.0f} | {'yes' if ddp <= GPU_BYTES / 2 else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-root", help="folder holding MNIST/raw (data.raw_root)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one untimed)")
    parser.add_argument("--variants", default="all",
                        help="all, or e.g. fsdp:2:blocks,ddp:1:none (train.parallel:workers:activation checkpointing)")
    parser.add_argument("--output", type=Path, default=Path("memory.json"), help="JSON; the table goes beside it")
    args = parser.parse_args()
    extra = [f"data.raw_root={args.data_root}"] if args.data_root else []
    cfg = load_config(args.config, [*args.overrides, *extra, "train.compile=none"])
    prepare_dataset(cfg)
    variants = VARIANTS if args.variants == "all" else \
        [(v.split(":")[0], int(v.split(":")[1]), v.split(":")[2]) for v in args.variants.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="sd3ray-memory-") as scratch:
        rows = []
        for parallel, workers, recompute in variants:
            rows.append(measure(cfg, parallel, workers, recompute, args.steps, Path(scratch)))
            print(f"{parallel} × {workers} ({recompute}): peak {mib(rows[-1]['peak'])} MiB, held "
                  f"{mib(rows[-1]['held'])} MiB, {rows[-1]['step_s']:.2f} s/step | {rows[-1]['plan']}", flush=True)
    table = report(rows, model_figures(cfg), args.config, cfg.train.batch_size, args.steps, device)
    print("\n" + table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"config": args.config, "rows": rows, **model_figures(cfg)}, indent=2))
    args.output.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
