"""Speed measurements, side by side in one process: sd3ray's MM-DiT vs diffusers' SD3Transformer2DModel at the
same dimensions under the library's own training step, sampling throughput, the data path, and MFU on GPU.

Measurement code lives here, outside the `sd3ray` package: the library's imports say what training depends on,
and nothing in training depends on this.

Both transformers get the same inputs (random context of the same length, pooled vector, t·1000 for diffusers'
timestep) and run `sd3ray.training.step.train_step` (loss, backward, clip, fused AdamW, EMA), so the ratio measures
the implementations, not the recipes. The text encoder is left out of that comparison (diffusers' transformer has
none); `benchmarks.step_speed` times the step that trains, text encoder and real batches included.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sd3ray.config import Config
from sd3ray.data.batches import TrainingBatches
from sd3ray.data.format import read_split
from sd3ray.evaluation.flops import PEAK_BF16_TFLOPS, mmdit_forward_flops, train_step_flops
from sd3ray.inference import generate
from sd3ray.model import Denoiser, MMDiT, count_parameters
from sd3ray.training.step import StepSettings, TrainState, build_train_state, train_step

H100_BF16_DENSE_TFLOPS = PEAK_BF16_TFLOPS["H100"]


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
    return interleaved_seconds({"fn": fn}, device, warmup, iters)["fn"]


def interleaved_seconds(calls: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                        iters: int) -> dict[str, float]:
    """Median wall time of each call, timed in alternation (A B A B ...) so that drift in the machine's speed
    (other load, clocks, the allocator's state) falls on every candidate alike instead of on whichever ran last."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            _synchronize(device)
            started = time.perf_counter()
            fn()
            _synchronize(device)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


# Ops whose time is set by the hardware's matmul/attention throughput: the part of a step no implementation of
# the same maths can avoid. Everything else (norms, activations, modulation, copies, the optimizer) is overhead.
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def is_attention_op(name: str) -> bool:
    return "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name


def kernel_seconds(step: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Seconds one step spends in GEMMs and in attention kernels, from PyTorch's profiler (self time of each op,
    device time on GPU), with the step's profiled total."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _synchronize(device)
    with profile(activities=activities) as prof:
        step()
        _synchronize(device)
    seconds = {"gemm_s": 0.0, "attention_s": 0.0, "profiled_s": 0.0}
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        seconds["profiled_s"] += us / 1e6
        if event.key in GEMM_OPS:
            seconds["gemm_s"] += us / 1e6
        elif is_attention_op(event.key):
            seconds["attention_s"] += us / 1e6
    return seconds


class FixedConditioning(nn.Module):
    """A transformer alone (sd3ray's MMDiT or diffusers' SD3 transformer) as the training step calls a denoiser,
    `(z_t, t, ids=, mask=) -> v`, with fixed context and pooled vectors in place of a text encoder: so both
    implementations train under the library's own `train_step` (same loss, clip, AdamW, EMA)."""

    def __init__(self, model: nn.Module, call: Callable[..., torch.Tensor], context: torch.Tensor,
                 pooled: torch.Tensor) -> None:
        super().__init__()
        self.model, self.call = model, call
        self.register_buffer("context", context)
        self.register_buffer("pooled", pooled)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.call(self.model, z_t, t, self.context, self.pooled)


def sd3ray_call(model: nn.Module, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
    return model(z_t, t, context, pooled)


def diffusers_call(model: nn.Module, z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   pooled: torch.Tensor) -> torch.Tensor:
    return model(z_t, context, pooled, t * 1000, return_dict=False)[0]


class StepCall:
    """One training step per call, through the library's `train_step`, on fixed inputs."""

    def __init__(self, state: TrainState, inputs: tuple[torch.Tensor, ...]) -> None:
        self.state, self.inputs, self.step = state, inputs, 0

    def __call__(self) -> None:
        train_step(self.state, *self.inputs, self.step)
        self.step += 1


def step_settings(bf16: bool, compiled: bool) -> StepSettings:
    return StepSettings(torch.bfloat16 if bf16 else None, "whole" if compiled else "none", "benchmark")


def model_step_rows(cfg: Config, batch: int, context_len: int, device: torch.device, bf16: bool, compile: bool,
                    warmup: int, iters: int, with_diffusers: bool) -> list[dict[str, Any]]:
    """Images/s of one training step for each implementation (eager, and compiled when asked), timed in
    alternation, with the share of each eager step spent in GEMMs and attention."""
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, m.channels, m.image_size, m.image_size, generator=g).to(device)
    eps = torch.randn(x0.shape, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    context = torch.randn(batch, context_len, m.context_dim, generator=g).to(device)
    pooled = torch.randn(batch, m.pooled_dim, generator=g).to(device)
    ids = torch.ones(batch, context_len, dtype=torch.long, device=device)  # unread: the context is fixed
    mask = torch.ones(batch, context_len, dtype=torch.bool, device=device)
    candidates: list[tuple[str, Callable[[], nn.Module], Callable[..., torch.Tensor]]] = [
        ("sd3ray", lambda: MMDiT(m), sd3ray_call)]
    if with_diffusers:
        candidates.append(("diffusers", lambda: build_diffusers_model(cfg), diffusers_call))
    rows: dict[str, dict[str, Any]] = {}
    steps: dict[str, StepCall] = {}
    for name, build, call in candidates:
        for compiled in ([False, True] if compile else [False]):
            torch.manual_seed(0)
            wrapped = FixedConditioning(build(), call, context, pooled)
            state = build_train_state(cfg, device, step_settings(bf16, compiled), model=wrapped)
            key = f"{name}{' compiled' if compiled else ''}"
            steps[key] = StepCall(state, (x0, ids, mask, t, eps))
            rows[key] = {"model": name, "what": "MM-DiT alone, the library's training step", "compiled": compiled,
                         "params_m": count_parameters(wrapped.model) / 1e6}
    for key, seconds in interleaved_seconds(steps, device, warmup, iters).items():
        rows[key] |= {"seconds_per_step": seconds, "images_per_s": batch / seconds}
    for key, step in steps.items():
        if not rows[key]["compiled"]:  # compiled kernels are fused and renamed: only eager ops split cleanly
            rows[key] |= kernel_seconds(step, device)
    return list(rows.values())


def eager_row(rows: list[dict[str, Any]], model: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["model"] == model and not r["compiled"]), None)


def gemm_attention_share(row: dict[str, Any]) -> float | None:
    """Fraction of the step spent in GEMMs and attention (eager rows only)."""
    return (row["gemm_s"] + row["attention_s"]) / row["seconds_per_step"] if "gemm_s" in row else None


def speed_ceiling(rows: list[dict[str, Any]]) -> float | None:
    """How many times faster than eager diffusers a step could be if it kept only sd3ray's GEMM and attention
    time: the most any implementation of the same maths can gain with these kernels on this device."""
    ours, theirs = eager_row(rows, "sd3ray"), eager_row(rows, "diffusers")
    if ours is None or theirs is None or "gemm_s" not in ours:
        return None
    return theirs["seconds_per_step"] / (ours["gemm_s"] + ours["attention_s"])


def mfu(cfg: Config, batch: int, context_len: int, seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation of an MM-DiT-only training step (3 × forward FLOPs) against the peak."""
    return 3 * mmdit_forward_flops(cfg, batch, context_len) / seconds / (peak_tflops * 1e12)


def full_step_tflop(cfg: Config, batch: int, context_len: int) -> float:
    return train_step_flops(cfg, batch, context_len) / 1e12


def sampling_row(cfg: Config, device: torch.device, num_images: int, steps: int, guidance: float,
                 bf16: bool) -> dict[str, Any]:
    """Images/s of Euler sampling with classifier-free guidance (weights perturbed so the work is real)."""
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
    return {"what": f"sampling ({steps} Euler steps, CFG {guidance:g})", "key": "sampling",
            "images_per_s": num_images / seconds}


def data_path_row(cfg: Config, device: torch.device, iters: int = 50) -> dict[str, Any]:
    """Seconds to assemble one training batch on the device (images, prompts, t, eps) from resident data."""
    started = time.perf_counter()
    batches = TrainingBatches(read_split(cfg.data.parquet_dir, "train"), cfg, 0, 1, device)
    load_seconds = time.perf_counter() - started
    step = iter(range(10**9))
    seconds = seconds_per_call(lambda: batches.get(next(step)), device, warmup=2, iters=iters)
    return {"what": "data path (Parquet -> resident -> batch)", "key": "data_path", "seconds_per_batch": seconds,
            "images_per_s": cfg.train.batch_size / seconds, "load_seconds": load_seconds}
