"""MMDiT: the SD3 multimodal diffusion transformer (Esser et al. 2024, §4), in pixel space."""

from __future__ import annotations

import math

import torch
from torch import nn

from sd3ray.config import ModelConfig
from sd3ray.model.block import MMDiTBlock, modulate
from sd3ray.model.embeddings import (
    PooledEmbedder,
    TimestepEmbedder,
    crop_positions,
    patchify,
    sincos_position_embedding,
    unpatchify,
)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a zero-initialised projection back to pixel patches."""

    def __init__(self, width: int, patch_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(cond).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class ConvStem(nn.Module):
    """Two 5×5 convolutions in pixel space before patchify: (B, C, H, W) -> (B, channels, H, W)."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        groups = math.gcd(8, channels)
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, channels, 5, padding=2), nn.SiLU(), nn.GroupNorm(groups, channels),
            nn.Conv2d(channels, channels, 5, padding=2), nn.SiLU(), nn.GroupNorm(groups, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ConvHead(nn.Module):
    """3×3 convolutions over the unpatchified per-pixel features: (B, channels, H, W) -> (B, C, H, W); one, or two
    with a SiLU between them. The last (`conv`) is zero-initialised, so the untrained model still predicts exactly 0
    (the layers before it are not, or no gradient would reach any of them)."""

    def __init__(self, channels: int, out_channels: int, layers: int = 1) -> None:
        super().__init__()
        self.hidden = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU()) if layers == 2 else None
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x if self.hidden is None else self.hidden(x))


class LongSkips(nn.Module):
    """U-ViT's long skips over a stack of `depth` blocks: the image tokens after block i (i < depth // 2) join the
    input of block depth−1−i, as concat(x, skip) projected back to the width. Each projection starts as [I | 0], the
    identity on x, so the untrained model is the one without skips and the skips grow from there."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.depth, self.pairs = depth, depth // 2
        self.linears = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(self.pairs))

    def initialize(self) -> None:
        for linear in self.linears:
            width = linear.out_features
            with torch.no_grad():
                linear.weight.zero_()
                linear.weight[:, :width].copy_(torch.eye(width))
                linear.bias.zero_()

    def saves(self, block: int) -> bool:
        return block < self.pairs

    def join(self, block: int, x: torch.Tensor, saved: list[torch.Tensor]) -> torch.Tensor:
        """The input of `block`: as it is in the first half, with its partner's output joined in the second."""
        first_joined = self.depth - self.pairs
        if block < first_joined:
            return x
        return self.linears[block - first_joined](torch.cat([x, saved.pop()], dim=-1))


class MMDiT(nn.Module):
    """forward(x (B,C,H,W), t (B,) in [0,1], context (B,L,Dc), pooled (B,Dp), context_mask (B,L) bool | None)
    -> predicted velocity (B,C,H,W)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.width
        self.stem = ConvStem(cfg.channels, cfg.conv_stem) if cfg.conv_stem else None
        self.head = ConvHead(cfg.conv_head, cfg.channels, cfg.conv_head_layers) if cfg.conv_head else None
        self.skips = LongSkips(cfg.depth, d) if cfg.long_skips else None
        self.patch_dim = p * p * (cfg.conv_stem or cfg.channels)  # what a token is made of
        self.out_dim = p * p * (cfg.conv_head or cfg.channels)  # what a token predicts
        self.x_embedder = nn.Linear(self.patch_dim, d)
        if cfg.pos_embed_max_size:  # SD3's table: a pretrained model's own positions, so kept in checkpoints
            self.register_buffer("pos_embed", sincos_position_embedding(d, cfg.pos_embed_max_size))
        else:
            self.register_buffer("pos_embed", sincos_position_embedding(d, cfg.image_size // p), persistent=False)
        self.t_embedder = TimestepEmbedder(d)
        self.pooled_embedder = PooledEmbedder(cfg.pooled_dim, d)
        self.context_embedder = nn.Linear(cfg.context_dim, d)
        self.blocks = nn.ModuleList(
            MMDiTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, context_pre_only=(i == cfg.depth - 1),
                       dual_attention=i in cfg.dual_attention_layers)
            for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(d, self.out_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears; adaLN-Zero: every modulation and the output projection start at zero, so each block
        starts as the identity and the untrained model predicts exactly 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for mlp in (self.t_embedder.mlp, self.pooled_embedder.mlp):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation[1].weight)
            nn.init.zeros_(block.modulation[1].bias)
        zeroed = [self.final_layer.modulation[1]]
        zeroed.append(self.head.conv if self.head is not None else self.final_layer.linear)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.skips is not None:
            self.skips.initialize()

    def positions(self, height: int, width: int) -> torch.Tensor:
        """(N, D) positions of an image's token grid: the computed grid, or the centre of SD3's table."""
        if not self.cfg.pos_embed_max_size:
            return self.pos_embed
        p = self.cfg.patch_size
        return crop_positions(self.pos_embed, self.cfg.pos_embed_max_size, height // p, width // p)

    def check_shape(self, c: int, h: int, w: int) -> None:
        """With SD3's position table, any H×W whose token grid fits in it (aspect-ratio buckets); without it, the
        square model.image_size its computed positions were made for."""
        m, p = self.cfg, self.cfg.patch_size
        if m.pos_embed_max_size:
            fits = c == m.channels and h % p == 0 and w % p == 0 and max(h, w) // p <= m.pos_embed_max_size
            if not fits:
                raise ValueError(f"MMDiT takes (B, {m.channels}, H, W) with H and W multiples of model.patch_size={p} "
                                 f"and at most {m.pos_embed_max_size * p} (model.pos_embed_max_size patches), got "
                                 f"{(c, h, w)}")
        elif (c, h, w) != (m.channels, m.image_size, m.image_size):
            raise ValueError(f"MMDiT expects images of shape (B, {m.channels}, {m.image_size}, {m.image_size}) "
                             f"(model.channels, model.image_size), got {(c, h, w)}; other shapes need SD3's position "
                             f"table (model.pos_embed_max_size)")

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        self.check_shape(c, h, w)
        pixels = self.stem(x) if self.stem is not None else x  # (B, C or conv_stem, H, W)
        img = self.x_embedder(patchify(pixels, self.cfg.patch_size)) + self.positions(h, w)  # (B, N, D)
        ctx = self.context_embedder(context)  # (B, L, D)
        cond = self.t_embedder(t) + self.pooled_embedder(pooled)  # (B, D)
        saved: list[torch.Tensor] = []  # image tokens the long skips carry from the first half to the second
        for i, block in enumerate(self.blocks):
            if self.skips is not None:
                img = self.skips.join(i, img, saved)
            img, ctx = block(img, ctx, cond, context_mask)
            if self.skips is not None and self.skips.saves(i):
                saved.append(img)
        out = self.final_layer(img, cond)  # (B, N, p·p·C) or (B, N, p·p·conv_head)
        if self.head is None:
            return unpatchify(out, self.cfg.patch_size, c, h, w)  # (B, C, H, W)
        return self.head(unpatchify(out, self.cfg.patch_size, self.cfg.conv_head, h, w))  # (B, C, H, W)
