"""ODE samplers for rectified flow: Euler and Heun from t = 1 (noise) to t = 0 (data). dt is 1/N for N steps
(before the optional shift), never a fixed constant.

The samplers know nothing of models or prompts: they integrate any `(z_t, t) -> v` function. Guidance and text
conditioning happen where that function is made (`Denoiser.velocity_fn`).
"""

from __future__ import annotations

from typing import Literal

import torch

from sd3ray.core.flow import VelocityFn, shift_timesteps


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
    """Second-order: average the slopes at both ends of each step (exact when v is linear in t along the path). A
    step that ends at t = 0 is an Euler step, as in EDM and k-diffusion: the velocity at t = 0 is never evaluated,
    a time training essentially never samples (and where v = (z_t − x0)/t has no limit the model learned)."""
    x = noise
    for t_cur, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t_cur
        v_cur = velocity_fn(x, t_cur.expand(x.shape[0]))
        x_pred = x + dt * v_cur
        if t_next <= 0:
            x = x_pred
            break
        v_next = velocity_fn(x_pred, t_next.expand(x.shape[0]))
        x = x + dt * 0.5 * (v_cur + v_next)
    return x


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
