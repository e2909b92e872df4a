"""Rectified flow, as in SD3 (Esser et al. 2024).

Convention, stated once: t = 0 is data and t = 1 is noise.
    z_t = (1 − t)·x0 + t·eps,    velocity target v = eps − x0,
so dz_t/dt = v and sampling integrates from t = 1 (noise) down to t = 0 (data). The network sees t·1000 in its
sinusoidal embedding (sd3ray.model.embeddings).

Training timesteps follow one of SD3 §3.1's densities over t, optionally mixed with a share of uniform draws
(`flow.uniform_fraction`), then moved towards noise by the resolution shift of §5.3.2: t' = α·t / (1 + (α − 1)·t).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sd3ray.config import FlowConfig

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (z_t, t) -> v


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 §5.3.2 resolution shift; shift > 1 spends more time near noise. shift = 1 is the identity."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


FLUX_TOKENS, FLUX_MU = (256, 4096), (0.5, 1.15)  # Flux's μ(sequence length): a line through these two points


def resolve_shift(shift: float | str, rule: str, reference_tokens: int, tokens: int | None) -> float:
    """The resolution shift α for an image of `tokens` tokens: a number as it is; `auto` by SD3's rule, α = √(m/n)
    (§5.3.2: the same noise destroys less of an image with more pixels, so time moves towards noise by the ratio of
    their sides), n = `reference_tokens`; or Flux's, α = exp(μ) with μ linear in m through (256, 0.5) and
    (4096, 1.15)."""
    if shift != "auto":
        return float(shift)
    if tokens is None:
        raise ValueError("flow.shift=auto needs the batch's token count")
    if rule == "flux":
        slope = (FLUX_MU[1] - FLUX_MU[0]) / (FLUX_TOKENS[1] - FLUX_TOKENS[0])
        return math.exp(FLUX_MU[0] + slope * (tokens - FLUX_TOKENS[0]))
    return math.sqrt(tokens / reference_tokens)


def sample_timesteps(
    cfg: FlowConfig, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
    tokens: int | None = None,
) -> torch.Tensor:
    """n training timesteps in (0, 1) drawn from the configured density, then shifted (`flow.shift`, or with auto
    from the batch's image `tokens`)."""
    match cfg.scheme:
        case "uniform":
            t = torch.rand(n, generator=generator, device=device)
        case "logit_normal":
            # π_ln(t; m, s): logit(t) ~ N(m, s²)
            u = torch.randn(n, generator=generator, device=device)
            t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * u)
        case "mode":
            # f_mode(u; s) = 1 − u − s·(cos²(πu/2) − 1 + u); s = 0 is uniform, s > 0 favours the middle
            u = torch.rand(n, generator=generator, device=device)
            t = 1 - u - cfg.mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        case "cosmap":
            # f_cosmap(u) = 1 − 1 / (tan(πu/2) + 1)
            u = torch.rand(n, generator=generator, device=device)
            t = 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)
    if cfg.uniform_fraction > 0:  # a mixture: each draw is uniform with this probability (no extra draws when 0)
        uniform = torch.rand(n, generator=generator, device=device)
        chosen = torch.rand(n, generator=generator, device=device) < cfg.uniform_fraction
        t = torch.where(chosen, uniform, t)
    return shift_timesteps(t.clamp(0.0, 1.0), resolve_shift(cfg.shift, cfg.shift_rule, cfg.shift_reference_tokens,
                                                            tokens))


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 − t)·x0 + t·eps, with t (B,) broadcast over the image dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def velocity_from_x0(z_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, t_min: float) -> torch.Tensor:
    """The velocity an x0-predicting network implies: z_t = (1 − t)·x0 + t·eps gives eps − x0 = (z_t − x0) / t. The
    division is capped at 1/t_min, so near the data a small error in x̂0 is not blown up; the loss stays the
    velocity loss on this v̂ (flow.prediction = x0)."""
    t = t.view(-1, *([1] * (z_t.dim() - 1))).clamp_min(t_min)
    return (z_t - x0_hat) / t


def per_sample_loss(velocity_fn: VelocityFn, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """‖v̂(z_t, t) − (eps − x0)‖² averaged over pixels: (B,)."""
    v_hat = velocity_fn(interpolate(x0, eps, t), t)
    return (v_hat.float() - velocity_target(x0, eps).float()).pow(2).flatten(1).mean(1)


def flow_loss(velocity_fn: VelocityFn, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The rectified-flow training loss (scalar)."""
    return per_sample_loss(velocity_fn, x0, eps, t).mean()


def validation_levels(num_levels: int) -> torch.Tensor:
    """Evenly spaced t levels at bin centres, (k + ½)/K: avoid the degenerate endpoints t = 0 and t = 1."""
    return (torch.arange(num_levels, dtype=torch.float32) + 0.5) / num_levels


@torch.no_grad()
def fixed_t_validation_loss(
    velocity_fn: VelocityFn, x0: torch.Tensor, eps: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """Loss at each fixed t level with the same x0 and eps for every level: (K,).

    Independent of the training timestep density, so runs with different schemes compare fairly (SD3 §5.1).
    """
    losses = []
    for level in levels.tolist():
        t = torch.full((x0.shape[0],), level, device=x0.device)
        losses.append(per_sample_loss(velocity_fn, x0, eps, t).mean())
    return torch.stack(losses)
