"""Patch, position, timestep and pooled-text embeddings of the MM-DiT."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

TIMESTEP_SCALE = 1000.0  # the sinusoidal embedding is designed for t·1000, not t ∈ [0, 1]


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p · W/p, p·p·C) tokens in row-major patch order."""
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, p·p·C) -> (B, C, H, W)."""
    return rearrange(tokens, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)",
                     h=height // patch_size, w=width // patch_size, p1=patch_size, p2=patch_size, c=channels)


def sincos_position_embedding(width: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (grid_size², width): half the channels encode rows, half columns."""
    axis = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    quarter = width // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * freqs  # (N, width/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, width/2)

    emb = torch.cat([encode(rows), encode(cols)], dim=1)  # (N, 4·quarter)
    if emb.shape[1] < width:  # widths not divisible by 4 get zero padding
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], width - emb.shape[1])], dim=1)
    return emb.float()


def crop_positions(table: torch.Tensor, max_size: int, rows: int, cols: int) -> torch.Tensor:
    """The centre rows × cols of a (max_size², D) position table, as SD3 crops its table: (rows·cols, D)."""
    top, left = (max_size - rows) // 2, (max_size - cols) // 2
    grid = table.view(max_size, max_size, -1)[top : top + rows, left : left + cols]  # (rows, cols, D)
    return grid.reshape(rows * cols, -1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t·1000: (B,) in [0, 1] -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * TIMESTEP_SCALE)[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim))  # (B, width)


class PooledEmbedder(nn.Module):
    """Projects the pooled text vector into the conditioning space (added to the timestep embedding)."""

    def __init__(self, pooled_dim: int, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(pooled_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled)  # (B, width)
