"""The MM-DiT block (SD3 Fig. 2b): two streams with their own weights, adaLN-Zero modulation, joint attention."""

from __future__ import annotations

import torch
from torch import nn

from sd3ray.model.attention import StreamQKV, joint_attention, self_attention


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class FeedForward(nn.Sequential):
    def __init__(self, width: int, mlp_ratio: float) -> None:
        hidden = int(width * mlp_ratio)
        super().__init__(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


class MMDiTBlock(nn.Module):
    """One block. With `context_pre_only` (the last block) the text stream only feeds keys/values to the image
    stream, so it needs just its pre-attention (shift, scale) pair and no output projection or MLP. With
    `dual_attention` (SD3.5's MMDiT-X) the image stream also attends to itself alone, from the same normalised input
    under its own (shift, scale, gate), after the joint attention."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, qk_norm: bool, context_pre_only: bool,
                 dual_attention: bool = False) -> None:
        super().__init__()
        self.context_pre_only = context_pre_only
        self.dual_attention = dual_attention
        self.num_img_mods = 9 if dual_attention else 6
        self.num_context_mods = 2 if context_pre_only else 6
        # One fused projection yields all modulation vectors of both streams: 6 (or 9) for the image, 6 (or 2) for text.
        num_mods = self.num_img_mods + self.num_context_mods
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, num_mods * width))
        self.img_norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.img_qkv = StreamQKV(width, num_heads, qk_norm)
        self.img_proj = nn.Linear(width, width)
        self.img_norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.img_mlp = FeedForward(width, mlp_ratio)
        self.ctx_norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ctx_qkv = StreamQKV(width, num_heads, qk_norm)
        if not context_pre_only:
            self.ctx_proj = nn.Linear(width, width)
            self.ctx_norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.ctx_mlp = FeedForward(width, mlp_ratio)
        if dual_attention:
            self.img_qkv2 = StreamQKV(width, num_heads, qk_norm)
            self.img_proj2 = nn.Linear(width, width)

    def forward(
        self, img: torch.Tensor, ctx: torch.Tensor, cond: torch.Tensor, context_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """img (B, N, D), ctx (B, L, D), cond (B, D) -> updated img, and ctx (None after the last block)."""
        mods = self.modulation(cond).chunk(self.num_img_mods + self.num_context_mods, dim=1)  # each (B, D)
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = mods[:6]
        c_mods = mods[self.num_img_mods:]
        img_normed = self.img_norm1(img)  # (B, N, D)
        img_qkv = self.img_qkv(modulate(img_normed, i_shift1, i_scale1))  # 3 × (B, N, H, hd)
        ctx_qkv = self.ctx_qkv(modulate(self.ctx_norm1(ctx), c_mods[0], c_mods[1]))  # 3 × (B, L, H, hd)
        ctx_attn, img_attn = joint_attention(ctx_qkv, img_qkv, context_mask)  # (B, L, D), (B, N, D)
        img = img + i_gate1[:, None] * self.img_proj(img_attn)
        if self.dual_attention:
            shift, scale, gate = mods[6:9]
            img_attn2 = self_attention(self.img_qkv2(modulate(img_normed, shift, scale)))  # (B, N, D)
            img = img + gate[:, None] * self.img_proj2(img_attn2)
        img = img + i_gate2[:, None] * self.img_mlp(modulate(self.img_norm2(img), i_shift2, i_scale2))
        if self.context_pre_only:
            return img, None
        c_gate1, c_shift2, c_scale2, c_gate2 = c_mods[2:]
        ctx = ctx + c_gate1[:, None] * self.ctx_proj(ctx_attn)
        ctx = ctx + c_gate2[:, None] * self.ctx_mlp(modulate(self.ctx_norm2(ctx), c_shift2, c_scale2))
        return img, ctx
