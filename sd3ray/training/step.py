"""THE training step: what the loop, every benchmark and the GPU report run, so what is timed is what trains.

`TrainState` holds what one optimizer step changes (weights, EMA, AdamW moments, the learning-rate schedule) and
how the step runs (autocast dtype, compilation, gradient clipping, data parallelism). `train_step` is one step of the
rectified-flow objective on one batch: forward under autocast, loss, backward, clip, AdamW, scheduler, EMA. It
returns the loss and the gradient norm as device tensors: reading them is the caller's choice, at log steps only.
The same step runs alone, under DDP and under FSDP2 (`sd3ray.training.parallel`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from sd3ray.config import Config, TrainConfig
from sd3ray.core.ema import EMA
from sd3ray.core.flow import flow_loss
from sd3ray.model import Denoiser
from sd3ray.model.lora import ema_for, prepare_finetune
from sd3ray.training import parallel
from sd3ray.training.machine import cpu_native_bf16
from sd3ray.training.parallel import ParallelPlan, UnshardedCopy

# Measured with `python -m benchmarks.step_speed` (docs/performance.md): on a CPU with AMX, bf16 autocast slowed
# mnist_tiny's width-128 step (0.91x: its GEMMs are too small to repay the casts) and sped up wider models.
BF16_MIN_CPU_WIDTH = 256
# Compiling costs ~40 s the first time on a 2-core CPU (seconds from inductor's cache) and ran mnist_tiny's step
# 1.2x faster: it pays in runs of this many steps or minutes, not in a short test run.
COMPILE_MIN_STEPS = 1000
COMPILE_MIN_MINUTES = 5.0


@dataclass
class StepSettings:
    """How the step runs on this device: `train.precision` and `train.compile` as `resolve_step_settings` read them."""

    dtype: torch.dtype | None  # autocast dtype, None = fp32
    compile: str  # "none" | "blocks" | "whole"
    reason: str  # one line for the console: what was chosen and why

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


@dataclass
class TrainState:
    """Everything one optimizer step reads and changes."""

    model: nn.Module  # the trained weights (what the optimizer, the EMA and checkpoints see)
    net: nn.Module  # what the step calls: `model`, wrapped for data parallelism and/or compiled
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # the factor of `learning_rate_factor`, read at every step
    settings: StepSettings
    grad_clip: float  # 0 = no clipping
    device: torch.device
    plan: ParallelPlan  # how the model is spread over the workers
    unsharded_ema: UnshardedCopy | None = None  # under FSDP, rank 0's copy of the EMA to evaluate


def resolve_step_settings(cfg: Config, device: torch.device) -> StepSettings:
    """`train.precision` and `train.compile` for this device: explicit values as given; `auto` by what the device
    has and what measured faster, with the reason in one line."""
    tc = cfg.train
    dtype, precision_why = resolve_precision(cfg, device)
    if tc.compile != "auto":
        mode, compile_why = tc.compile, "set in the config"
    elif not long_run(tc):
        mode, compile_why = "none", (f"auto: a run under {COMPILE_MIN_STEPS} steps or {COMPILE_MIN_MINUTES:g} "
                                     "minutes does not repay compiling")
    else:
        mode = "whole" if device.type == "cuda" else "blocks"
        compile_why = "auto: a long run repays compiling"
    precision = "fp32" if dtype is None else "bf16 autocast"
    return StepSettings(dtype, mode, f"{precision} ({precision_why}), compile {mode} ({compile_why})")


def resolve_precision(cfg: Config, device: torch.device) -> tuple[torch.dtype | None, str]:
    match cfg.train.precision:
        case "fp32":
            return None, "set in the config"
        case "bf16":
            return torch.bfloat16, "set in the config"
    if device.type == "cuda":
        return torch.bfloat16, "auto: GPU"
    if device.type != "cpu":
        return None, f"auto: {device.type}"
    native = cpu_native_bf16()
    if not native:
        return None, "auto: this CPU has no native bf16 matrix units"
    if cfg.model.width < BF16_MIN_CPU_WIDTH:
        return None, (f"auto: model.width {cfg.model.width} < {BF16_MIN_CPU_WIDTH}, too narrow to repay bf16 "
                      f"casts even with {'/'.join(native)}")
    return torch.bfloat16, f"auto: {'/'.join(native)} at model.width {cfg.model.width}"


def long_run(tc: TrainConfig) -> bool:
    return tc.max_minutes >= COMPILE_MIN_MINUTES if tc.max_minutes > 0 else tc.steps >= COMPILE_MIN_STEPS


def wsd_decay_start(cfg: TrainConfig, end: int) -> int:
    """The step at which a wsd rate that reaches zero at `end` begins its linear decay (at least one step)."""
    return end - max(1, round(cfg.decay_fraction * end))


def learning_rate_factor(step: int, cfg: TrainConfig, horizon: int | None = None) -> float:
    """Linear warmup, then constant, cosine decay to zero at `horizon` (default `train.steps`), or warmup-stable-
    decay: constant, then linear to zero over the last `train.decay_fraction` of the horizon (a constant rate with
    no cooldown leaves the last weights noisy; WSD anneals them while keeping the long constant phase)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    end = cfg.steps if horizon is None else horizon
    if cfg.lr_schedule == "wsd":
        return min(1.0, max(0.0, (end - step) / (end - wsd_decay_start(cfg, end))))
    progress = (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def reschedule_after_resume(state: TrainState, tc: TrainConfig) -> None:
    """Set the next step's learning rate from this run's schedule: `train.lr` times the schedule's factor at the
    resumed step, with the horizon this session settled on.

    Loading AdamW's state restores the rate of the checkpoint's last step, computed under the horizon it ran with:
    a run resumed with a larger `train.steps` would take its first step at the old schedule's rate (zero, for a
    wsd or cosine run that had reached its end) and only the steps after it at the new schedule's."""
    scheduler = state.scheduler
    scheduler.base_lrs = [tc.lr for _ in scheduler.base_lrs]
    for group, factor in zip(state.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = tc.lr * factor(scheduler.last_epoch)


def moved_decay_notice(tc: TrainConfig, step: int, saved_horizon: int | None, horizon: int) -> str | None:
    """One line when a resume moves where the learning rate decays to zero (a changed `train.steps`): what the rate
    is now against what the checkpoint's schedule gave, and how to keep a wsd run's one decay."""
    if tc.lr_schedule == "constant" or not saved_horizon or saved_horizon == horizon:
        return None
    before, after = (tc.lr * learning_rate_factor(step, tc, end) for end in (saved_horizon, horizon))
    line = (f"the {tc.lr_schedule} schedule now decays to zero at step {horizon}, not {saved_horizon}: at step "
            f"{step} the learning rate is {after:.3g}, where the checkpoint's schedule gave {before:.3g}")
    if tc.lr_schedule == "wsd" and after > before:
        began = wsd_decay_start(tc, saved_horizon)
        line += (f". The run had begun its decay at step {began}: to extend it with one decay, resume from a "
                 f"checkpoint at or before step {began}")
    return line


def adamw(model: nn.Module, device: torch.device, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW with the fused kernel where PyTorch has one: it updates every tensor in one pass, measured 4-5x
    faster than foreach on CPU too. Frozen weights (a LoRA base) are not its to hold."""
    trained = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trained, fused=device.type in ("cuda", "cpu"), **kwargs)


CPP_EXTENSION_LOGGER = "torch.utils.cpp_extension"


def no_cuda_notice(record: logging.LogRecord) -> bool:
    """False for torch's "No CUDA runtime is found, using CUDA_HOME=..." warning. The compiler imports
    torch.utils.cpp_extension, which prints it on every CPU machine that has a CUDA toolkit installed (an nvcc on
    the PATH) but no GPU: it concerns CUDA extensions, which a CPU run never builds."""
    return not record.getMessage().startswith("No CUDA runtime is found")


def compile_model(model: nn.Module, net: nn.Module, mode: str) -> nn.Module:
    """`blocks`: one graph per MM-DiT block, compiled once and reused by every block of the same shape (short
    first-run cost); `whole`: the whole denoiser as one graph (longer to compile, fewer launches)."""
    if mode != "none":
        cpp_logger = logging.getLogger(CPP_EXTENSION_LOGGER)  # the logger torch creates on import, if not yet
        if no_cuda_notice not in cpp_logger.filters:
            cpp_logger.addFilter(no_cuda_notice)
    match mode:
        case "blocks":
            for block in model.mmdit.blocks:
                block.compile()
            return net
        case "whole":
            return torch.compile(net)
    return net


def build_train_state(cfg: Config, device: torch.device, settings: StepSettings,
                      horizon: Callable[[], int | None] = lambda: None,
                      wrap: Callable[[nn.Module, ParallelPlan], nn.Module] | None = None,
                      model: nn.Module | None = None) -> TrainState:
    """A fresh state for `cfg` on `device` (the caller seeds torch first: the weights come from its RNG).

    `horizon()` is read at every scheduler step: the step the cosine decays to zero at (None: `train.steps`),
    which a time budget may move. `wrap` applies the parallel plan (`ctx.prepare_model`; default
    `sd3ray.training.parallel.wrap`). `model` replaces the Denoiser (the benchmarks' MM-DiT-only comparisons); it
    must take `(z_t, t, ids=, mask=)`."""
    tc = cfg.train
    model = prepare_finetune(model or Denoiser(cfg), cfg)  # pretrained weights, LoRA adapters
    plan = parallel.resolve_parallel(cfg, device, model, settings.dtype)
    if not plan.sharded:  # FSDP moves each rank's shards to the device itself: the whole model never lands there
        model = model.to(device)
    ema = ema_for(model, tc.ema_decay)
    unsharded_ema = UnshardedCopy(ema.model) if plan.sharded and parallel.is_main_rank() else None
    net = wrap(model, plan) if wrap is not None else parallel.wrap(model, plan, device)
    parallel.shard_like(ema.model, plan, device)
    # after wrapping: FSDP replaced the parameters with sharded ones, which the optimizer must hold
    optimizer = adamw(model, device, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, tc.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor(s, tc, horizon()))
    net = compile_model(model, net, settings.compile)
    return TrainState(model, net, ema, optimizer, scheduler, settings, tc.grad_clip, device, plan, unsharded_ema)


def clip_gradients(parameters: list[nn.Parameter], limit: float) -> torch.Tensor:
    """Scale the gradients to a global norm of at most `limit` (0: no clipping); return the norm before clipping,
    as clip_grad_norm_ does. Under FSDP the norm of each rank's slices is a partial one: its full_tensor() is the
    norm over every rank's, so the clip and the logged norm are those of the whole model."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total: Any = torch.nn.utils.get_total_norm(grads)
    if parallel.is_dtensor(total):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, limit or float("inf"), total)
    return total


def train_step(state: TrainState, x0: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, t: torch.Tensor,
               eps: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on x0 (B,C,H,W) in [-1,1], prompt tokens ids/mask (B,L), t (B,), eps (B,C,H,W).

    `step` is the number of steps already taken (the EMA's warm-up reads it). Returns the loss and the
    pre-clip gradient norm, both 0-dim device tensors (no host sync)."""
    with state.settings.autocast(state.device):
        loss = flow_loss(partial(state.net, ids=ids, mask=mask), x0, eps, t)
    loss.backward()
    grad_norm = clip_gradients(list(state.model.parameters()), state.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.ema.update(state.model, step)
    return loss.detach(), grad_norm.detach()
