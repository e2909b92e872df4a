"""Joint attention of the MM-DiT: each stream projects its own q, k, v; one attention runs over both."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QKNorm(nn.Module):
    """RMSNorm over the head dim whose gain follows the input's dtype: under bf16 autocast q and k arrive in bf16
    and an fp32 gain would keep PyTorch from its fused kernel (it falls back to the composite op and warns)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # the name nn.RMSNorm uses, so checkpoints load either way

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class StreamQKV(nn.Module):
    """One stream's fused q/k/v projection with per-head RMSNorm on q and k (SD3 §5.3.1, for bf16 stability)."""

    def __init__(self, width: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = width // num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm: nn.Module = QKNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = QKNorm(head_dim) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).unbind(2)  # each (B, N, H, hd)
        return self.q_norm(q), self.k_norm(k), v


def joint_attention(
    ctx_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    img_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    context_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the concatenated [context, image] sequence.

    ctx_qkv: three (B, L, H, hd); img_qkv: three (B, N, H, hd); context_mask (B, L) bool, True = real token.
    Returns context (B, L, H·hd) and image (B, N, H·hd) outputs. Padding tokens are never attended to; image
    tokens always are, so no query row is fully masked.
    """
    length = ctx_qkv[0].shape[1]
    q, k, v = (torch.cat([c, i], dim=1).transpose(1, 2) for c, i in zip(ctx_qkv, img_qkv))  # (B, H, L+N, hd)
    attn_mask = None
    if context_mask is not None:
        image_keys = context_mask.new_ones(context_mask.shape[0], img_qkv[0].shape[1])
        attn_mask = torch.cat([context_mask, image_keys], dim=1)[:, None, None, :]  # (B, 1, 1, L+N)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L+N, hd)
    out = out.transpose(1, 2).flatten(2)  # (B, L+N, H·hd)
    return out[:, :length], out[:, length:]


def self_attention(qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Attention over one stream alone (SD3.5's second, image-only attention): three (B, N, H, hd) -> (B, N, H·hd)."""
    q, k, v = (x.transpose(1, 2) for x in qkv)  # (B, H, N, hd)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
