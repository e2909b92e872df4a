"""The trainable pair: text encoder + MM-DiT as one module, so DDP and EMA see a single parameter set."""

from __future__ import annotations

import torch
from torch import nn

from sd3ray.config import Config
from sd3ray.model.mmdit import MMDiT
from sd3ray.text import TextEncoder


class Denoiser(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.text_encoder = TextEncoder(cfg.text)
        self.mmdit = MMDiT(cfg.model)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z_t (B,C,H,W), t (B,), prompt token ids and mask (B,L) -> velocity (B,C,H,W)."""
        context, pooled = self.text_encoder.encode(ids, mask)
        return self.mmdit(z_t, t, context, pooled, mask)

    def velocity(self, z_t: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.text_encoder.tokenize(prompts)
        return self(z_t, t, ids, mask)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
