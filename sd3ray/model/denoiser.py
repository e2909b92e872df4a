"""The trainable pair, text encoder + MM-DiT, as one module (so DDP and EMA see a single parameter set), and its
one conditioning path: encode prompts once, then ask for velocities with or without classifier-free guidance.

Training calls `forward(z_t, t, ids, mask)` on pre-tokenised batches; everything that samples or validates goes
through `condition` / `velocity` / `velocity_fn`, so samplers only ever see a `(z_t, t) -> v` function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sd3ray.config import Config
from sd3ray.flow import VelocityFn
from sd3ray.model.mmdit import MMDiT
from sd3ray.model.text_encoder import TextEncoder


@dataclass(frozen=True)
class Conditioning:
    """Encoded prompts: what the MM-DiT attends to and is modulated by."""

    context: torch.Tensor  # (B, L, D) token embeddings
    pooled: torch.Tensor  # (B, D)
    mask: torch.Tensor  # (B, L) bool, True = real token


class Denoiser(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.text_encoder = TextEncoder(cfg.text)
        self.mmdit = MMDiT(cfg.model)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training: z_t (B,C,H,W), t (B,), prompt token ids and mask (B,L) -> velocity (B,C,H,W)."""
        context, pooled = self.text_encoder(ids, mask)
        return self.mmdit(z_t, t, context, pooled, mask)

    def condition(self, prompts: list[str]) -> Conditioning:
        """Encode prompts once, to reuse over every step of a trajectory."""
        ids, mask = self.text_encoder.tokenize(prompts)
        context, pooled = self.text_encoder(ids, mask)
        return Conditioning(context, pooled, mask)

    def velocity(self, z_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """z_t (B,C,H,W), t (B,) -> v (B,C,H,W) for already encoded prompts."""
        return self.mmdit(z_t, t, cond.context, cond.pooled, cond.mask)

    def velocity_fn(self, prompts: list[str], guidance: float = 1.0) -> VelocityFn:
        """The (guided) velocity for a batch of prompts, as a function of (z_t, t) only.

        Classifier-free guidance: v = v_uncond + guidance·(v_cond − v_uncond); guidance = 1 is the conditional
        model. The two branches run as one batch of 2B, which is how CFG is cheapest on any device.
        """
        if guidance == 1.0:
            cond = self.condition(prompts)
            return lambda z_t, t: self.velocity(z_t, t, cond)
        both = self.condition(list(prompts) + [""] * len(prompts))  # row 0 of a prompt bank is "" too

        def guided(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v_cond, v_uncond = self.velocity(torch.cat([z_t, z_t]), torch.cat([t, t]), both).chunk(2)
            return v_uncond + guidance * (v_cond - v_uncond)

        return guided


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
