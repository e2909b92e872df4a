"""Memory of fine-tuning: every weight against LoRA at two ranks, measured on the library's own training state and
step (`build_train_state`, `train_step`), from pretrained weights (`model.init_from`).

    python -m benchmarks.finetune_memory                                   # mnist.yaml and a tiny SD3, ranks 8, 64
    python -m benchmarks.finetune_memory --setups tiny-sd3 --ranks 4,16 --batch 8 --output out/memory.json

Each variant runs in a fresh process (peak memory is a per-process high-water mark): it builds the state from a
base model written beforehand (the setup's MM-DiT, randomly initialised and exported as a diffusers folder), takes
`--steps` steps on random batches of the config's shapes and reports trainable parameters, the optimizer's bytes,
the EMA's own bytes and the peak: `torch.cuda.max_memory_allocated` on a GPU, the process's peak resident set on a
CPU (beside its resident set before the state was built). Then the same formula docs/finetune.md gives is printed
for SD3 Medium, SD3.5 Medium and SD3.5 Large (their config.json shapes, counted on the meta device).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from sd3ray.config import Config, LoraConfig, ModelConfig, load_config
from sd3ray.model.interop import save_diffusers
from sd3ray.model.lora import adapter_size
from sd3ray.model.mmdit import MMDiT

SETUPS: dict[str, tuple[str, list[str]]] = {
    "mnist": ("configs/mnist.yaml", []),
    # SD3's block (RMS QK-norm, cropped position table) in miniature, on 3-channel 32×32 images
    "tiny-sd3": ("configs/mnist_tiny.yaml", [
        "model.channels=3", "model.patch_size=2", "model.width=256", "model.depth=4", "model.num_heads=4",
        "model.context_dim=256", "model.pooled_dim=256", "text.width=256", "model.pos_embed_max_size=24",
        "train.batch_size=16"]),
}
# the published config.json shapes (diffusers' `transformer` folders): width = heads × 64
SD3_FAMILY = {
    "SD3 Medium (2B)": ModelConfig(image_size=128, channels=16, patch_size=2, width=1536, depth=24, num_heads=24,
                                   qk_norm=False, context_dim=4096, pooled_dim=2048, pos_embed_max_size=192),
    "SD3.5 Medium": ModelConfig(image_size=128, channels=16, patch_size=2, width=1536, depth=24, num_heads=24,
                                context_dim=4096, pooled_dim=2048, pos_embed_max_size=384,
                                dual_attention_layers=tuple(range(13))),
    "SD3.5 Large (8B)": ModelConfig(image_size=128, channels=16, patch_size=2, width=2432, depth=38, num_heads=38,
                                    context_dim=4096, pooled_dim=2048, pos_embed_max_size=192),
}
GIB = 1024 ** 3


def setup_config(setup: str, base: Path, rank: int, batch: int | None) -> Config:
    path, sets = SETUPS[setup]
    grid = load_config(path, sets).model
    extra = [f"model.pos_embed_max_size={grid.pos_embed_max_size or grid.image_size // grid.patch_size}",
             f"model.init_from={base}", f"train.lora.rank={rank}", "train.precision=fp32", "train.compile=none"]
    return load_config(path, [*sets, *extra, *([f"train.batch_size={batch}"] if batch else [])])


def write_base(setup: str, folder: Path) -> Path:
    """The setup's MM-DiT, randomly initialised, as a diffusers folder: the pretrained weights of the run."""
    cfg = setup_config(setup, Path("unused"), 0, None).model
    torch.manual_seed(0)
    return save_diffusers(MMDiT(cfg).state_dict(), cfg, folder)


def measure_one(setup: str, base: Path, rank: int, steps: int, batch: int | None) -> dict[str, Any]:
    """One variant in this process: build, step, count. PEFT is imported first in every variant, so the resident
    set before the state is built holds the same libraries whatever is measured."""
    import peft  # noqa: F401

    from sd3ray.training.step import StepSettings, build_train_state, train_step

    cfg = setup_config(setup, base, rank, batch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rss_before = _peak_rss()
    torch.manual_seed(0)
    state = build_train_state(cfg, device, StepSettings(None, "none", "benchmark"))
    m, b = cfg.model, cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, m.channels, m.image_size, m.image_size, generator=g).to(device)
    ids = torch.randint(1, 255, (b, cfg.text.max_length), generator=g).to(device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    for step in range(steps):
        train_step(state, x0, ids, mask, torch.rand(b, generator=g).to(device), torch.randn_like(x0), step)
    params = list(state.model.parameters())
    live = {t.data_ptr() for t in [*params, *state.model.buffers()]}
    ema_own = sum(t.numel() * t.element_size() for t in [*state.ema.model.parameters(), *state.ema.model.buffers()]
                  if t.data_ptr() not in live)
    optimizer = sum(t.numel() * t.element_size() for s in state.optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t) and t.dim() > 0)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    row = {"setup": setup, "variant": f"LoRA r{rank}" if rank else "full", "trainable_params": trainable,
           "frozen_params": sum(p.numel() for p in params if not p.requires_grad), "optimizer_bytes": optimizer,
           "gradient_bytes": 4 * trainable, "ema_own_bytes": ema_own, "batch": b, "device": str(device)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        row["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:
        row["peak_rss_bytes"], row["rss_before_bytes"] = _peak_rss(), rss_before
    return row


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def family_rows(ranks: list[int]) -> list[dict[str, Any]]:
    """docs/finetune.md's formula per GPU (fp32 weights, DDP): full = 20 B per parameter (weights, EMA, gradients,
    two AdamW moments); LoRA = 4 B per frozen base parameter + 20 B per adapter parameter. Activations come on top."""
    rows = []
    for name, cfg in SD3_FAMILY.items():
        with torch.device("meta"):
            mmdit = MMDiT(cfg)
        total = sum(p.numel() for p in mmdit.parameters())
        rows.append({"model": name, "variant": "full", "params": total, "trainable": total,
                     "state_gib": 20 * total / GIB})
        for rank in ranks:
            added = adapter_size(mmdit, LoraConfig(rank=rank))
            rows.append({"model": name, "variant": f"LoRA r{rank}", "params": total, "trainable": added,
                         "state_gib": (4 * total + 20 * added) / GIB})
    return rows


def markdown(rows: list[dict[str, Any]], family: list[dict[str, Any]]) -> str:
    peak = "peak GPU MiB" if rows and "peak_bytes" in rows[0] else "peak RSS MiB (before state)"
    lines = ["| setup | variant | trainable params | frozen params | optimizer MiB | gradient MiB | EMA MiB | "
             f"{peak} |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    mib = 1024 ** 2
    for r in rows:
        measured = f"{r['peak_bytes'] / mib:.0f}" if "peak_bytes" in r else \
            f"{r['peak_rss_bytes'] / mib:.0f} ({r['rss_before_bytes'] / mib:.0f})"
        lines.append(f"| {r['setup']} | {r['variant']} | {r['trainable_params']:,} | {r['frozen_params']:,} | "
                     f"{r['optimizer_bytes'] / mib:.1f} | {r['gradient_bytes'] / mib:.1f} | "
                     f"{r['ema_own_bytes'] / mib:.1f} | {measured} |")
    lines += ["", "| model | variant | MM-DiT params | trainable | training state per GPU (GiB, + activations) |",
              "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['params'] / 1e9:.2f} B | {r['trainable'] / 1e6:,.1f} M | "
              f"{r['state_gib']:.1f} |" for r in family]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated subset of {list(SETUPS)}")
    parser.add_argument("--ranks", default="8,64", help="the two (or more) LoRA ranks")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, help="per-worker batch (default: the setup's train.batch_size)")
    parser.add_argument("--output", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--one", nargs=3, metavar=("SETUP", "BASE", "RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a variant's own process
        setup, base, rank = args.one
        print(json.dumps(measure_one(setup, Path(base), int(rank), args.steps, args.batch)))
        return
    ranks = [int(r) for r in args.ranks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="sd3ray-memory-") as scratch:
        for setup in args.setups.split(","):
            base = write_base(setup, Path(scratch) / setup)
            for rank in [0, *ranks]:
                command = [sys.executable, "-m", "benchmarks.finetune_memory", "--one", setup, str(base), str(rank),
                           "--steps", str(args.steps), *(["--batch", str(args.batch)] if args.batch else [])]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"{setup} rank {rank} failed:\n{done.stderr[-3000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    family = family_rows(ranks)
    print(markdown(rows, family))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"measured": rows, "formula": family}, indent=2))


if __name__ == "__main__":
    main()
