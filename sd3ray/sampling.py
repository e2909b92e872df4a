"""ODE samplers for rectified flow: Euler and Heun from t = 1 (noise) to t = 0 (data), with classifier-free
guidance. dt is 1/N for N steps (before the optional shift), never a fixed constant."""

from __future__ import annotations

from typing import Literal

import torch

from sd3ray.flow import VelocityFn, shift_timesteps


def timestep_schedule(num_steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """num_steps + 1 times from 1 down to 0 (evenly spaced, then shifted towards noise if shift > 1)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, num_steps + 1, device=device), shift)


@torch.no_grad()
def euler(velocity_fn: VelocityFn, noise: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """x_{i+1} = x_i + (t_{i+1} − t_i)·v(x_i, t_i)."""
    x = noise
    for t_cur, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t_cur) * velocity_fn(x, t_cur.expand(x.shape[0]))
    return x


@torch.no_grad()
def heun(velocity_fn: VelocityFn, noise: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Second-order: average the slopes at both ends of each step (exact when v is constant along the path)."""
    x = noise
    for t_cur, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t_cur
        v_cur = velocity_fn(x, t_cur.expand(x.shape[0]))
        x_pred = x + dt * v_cur
        v_next = velocity_fn(x_pred, t_next.expand(x.shape[0]))
        x = x + dt * 0.5 * (v_cur + v_next)
    return x


def guided(cond_fn: VelocityFn, uncond_fn: VelocityFn, scale: float) -> VelocityFn:
    """Classifier-free guidance: v = v_uncond + scale·(v_cond − v_uncond). scale = 1 is the conditional model."""
    if scale == 1.0:
        return cond_fn

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = cond_fn(x, t), uncond_fn(x, t)
        return v_uncond + scale * (v_cond - v_uncond)

    return velocity


def sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    num_steps: int,
    sampler: Literal["euler", "heun"] = "euler",
    shift: float = 1.0,
) -> torch.Tensor:
    """Integrate from `noise` (t = 1) to t = 0 in `num_steps` steps."""
    times = timestep_schedule(num_steps, shift, noise.device)
    match sampler:
        case "euler":
            return euler(velocity_fn, noise, times)
        case "heun":
            return heun(velocity_fn, noise, times)
    raise ValueError(f"unknown sampler {sampler!r}; allowed: euler, heun")


@torch.no_grad()
def prompt_velocity(denoiser: torch.nn.Module, prompts: list[str], guidance: float) -> VelocityFn:
    """The guided velocity of a `Denoiser` for a batch of prompts.

    The text is encoded once for the whole trajectory, and the conditional and unconditional branches run as
    one batch of 2B, which is how CFG is cheapest on any device.
    """
    encoder = denoiser.text_encoder
    if guidance == 1.0:
        ids, mask = encoder.tokenize(prompts)
        context, pooled = encoder.encode(ids, mask)
        return lambda x, t: denoiser.mmdit(x, t, context, pooled, mask)
    ids, mask = encoder.tokenize(list(prompts) + [""] * len(prompts))
    context, pooled = encoder.encode(ids, mask)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = denoiser.mmdit(torch.cat([x, x]), torch.cat([t, t]), context, pooled, mask).chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    return velocity


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> uint8 [0, 255]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> model space [-1, 1] (float32)."""
    return x.float() / 127.5 - 1.0
