"""Speed measurements, side by side in one process: the MM-DiT training step of sd3ray vs diffusers'
SD3Transformer2DModel at the same dimensions, sampling throughput, the data path, and MFU on GPU.

Both models get the same inputs (random context of the same length, pooled vector, t·1000 for diffusers' timestep),
the same loss and an AdamW step, so the ratio measures the implementations, not the recipes. The text encoder is
left out of the comparison (diffusers' transformer has none); it is in the FLOP count of a full sd3ray step.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from sd3ray.config import Config
from sd3ray.flops import mmdit_forward_flops, train_step_flops
from sd3ray.model import MMDiT, count_parameters

H100_BF16_DENSE_TFLOPS = 989.0


def build_diffusers_model(cfg: Config) -> nn.Module:
    """diffusers' SD3 transformer with sd3ray's dimensions (patch, depth, width, heads, context and pooled dims)."""
    from diffusers import SD3Transformer2DModel

    m = cfg.model
    return SD3Transformer2DModel(
        sample_size=m.image_size, patch_size=m.patch_size, in_channels=m.channels, out_channels=m.channels,
        num_layers=m.depth, attention_head_dim=m.width // m.num_heads, num_attention_heads=m.num_heads,
        joint_attention_dim=m.context_dim, caption_projection_dim=m.width, pooled_projection_dim=m.pooled_dim,
        pos_embed_max_size=m.image_size // m.patch_size, qk_norm="rms_norm" if m.qk_norm else None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of `fn` after `warmup` calls (compilation and allocator warm-up excluded)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _synchronize(device)
        started = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def train_step(model: nn.Module, forward: Callable[[], torch.Tensor], target: torch.Tensor,
               optimizer: torch.optim.Optimizer, autocast: contextlib.AbstractContextManager) -> Callable[[], None]:
    def step() -> None:
        with autocast:
            out = forward()
        loss = (out.float() - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def model_step_rows(cfg: Config, batch: int, context_len: int, device: torch.device, bf16: bool, compile: bool,
                    warmup: int, iters: int, with_diffusers: bool) -> list[dict[str, Any]]:
    """Images/s of one training step for each implementation (eager, and compiled when asked)."""
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, m.channels, m.image_size, m.image_size, generator=g).to(device)
    target = torch.randn(x.shape, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    context = torch.randn(batch, context_len, m.context_dim, generator=g).to(device)
    pooled = torch.randn(batch, m.pooled_dim, generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    candidates: list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]] = [
        ("sd3ray", lambda: MMDiT(m), lambda model: model(x, t, context, pooled)),
    ]
    if with_diffusers:
        candidates.append(("diffusers", lambda: build_diffusers_model(cfg),
                           lambda model: model(x, context, pooled, t * 1000, return_dict=False)[0]))
    rows = []
    for name, build, call in candidates:
        for compiled in ([False, True] if compile else [False]):
            torch.manual_seed(0)
            model = build().to(device).train()
            runner = torch.compile(model) if compiled else model
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            step = train_step(model, partial(call, runner), target, optimizer, autocast)
            seconds = seconds_per_call(step, device, warmup, iters)
            rows.append({"model": name, "compiled": compiled, "params_m": count_parameters(model) / 1e6,
                         "seconds_per_step": seconds, "images_per_s": batch / seconds})
            del model, optimizer, runner
    return rows


def mfu(cfg: Config, batch: int, context_len: int, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation of an MM-DiT-only training step (3 × forward FLOPs) against the peak."""
    return 3 * mmdit_forward_flops(cfg, batch, context_len) / seconds / (peak_tflops * 1e12)


def full_step_tflop(cfg: Config, batch: int, context_len: int) -> float:
    return train_step_flops(cfg, batch, context_len) / 1e12


def sampling_row(cfg: Config, device: torch.device, num_images: int, steps: int, guidance: float,
                 bf16: bool) -> dict[str, Any]:
    """Images/s of Euler sampling with classifier-free guidance (weights perturbed so the work is real)."""
    from sd3ray.model import Denoiser
    from sd3ray.validation import generate

    torch.manual_seed(0)
    model = Denoiser(cfg).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    prompts = [str(i % 10) for i in range(num_images)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def run() -> None:
        with autocast:
            generate(model, prompts, cfg, 0, device, guidance, steps, "euler", batch_size=num_images)

    seconds = seconds_per_call(run, device, warmup=1, iters=1)
    return {"what": f"sampling ({steps} Euler steps, CFG {guidance:g})", "images_per_s": num_images / seconds}


def data_path_row(cfg: Config, device: torch.device, iters: int = 50) -> dict[str, Any]:
    """Seconds to assemble one training batch on the device (images, prompts, t, eps) from resident data."""
    from sd3ray.data import read_split
    from sd3ray.train_loop import TrainingBatches

    started = time.perf_counter()
    batches = TrainingBatches(read_split(cfg.data.parquet_dir, "train"), cfg, 0, 1, device)
    load_seconds = time.perf_counter() - started
    step = iter(range(10**9))
    seconds = seconds_per_call(lambda: batches.get(next(step)), device, warmup=2, iters=iters)
    return {"what": "data path (Parquet -> resident -> batch)", "seconds_per_batch": seconds,
            "images_per_s": cfg.train.batch_size / seconds, "load_seconds": load_seconds}
