"""The byte-level text encoder, trained jointly with the MM-DiT.

SD3 conditions on frozen CLIP and T5. Neither can be fetched offline and both are far larger than digits need,
so sd3ray trains a small transformer over UTF-8 bytes (`sd3ray.model.tokenizer`): no vocabulary file, any text
encodes. It returns what the MM-DiT consumes: token embeddings for joint attention and a pooled vector for the
adaLN modulation; the padding mask comes from the tokenizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sd3ray.config import TextConfig
from sd3ray.model.tokenizer import PAD_ID, VOCAB_SIZE, tokenize


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer; padding keys are masked out of attention."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, L, head_dim)
        x = x + self.proj(h.transpose(1, 2).reshape(b, length, d))
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Byte transformer: forward(ids (B,L), mask (B,L) bool) -> context (B,L,D), pooled (B,D)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(VOCAB_SIZE, cfg.width, padding_idx=PAD_ID)
        self.position_embedding = nn.Parameter(torch.randn(cfg.max_length, cfg.width) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(cfg.width, cfg.num_heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.pool = nn.Linear(cfg.width, cfg.width)
        self._token_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask on this module's device, tokenising each distinct prompt once."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._token_cache]
        if missing:
            ids, mask = tokenize(missing, self.cfg.max_length)
            for i, p in enumerate(missing):
                self._token_cache[p] = (ids[i], mask[i])
        device = self.token_embedding.weight.device
        ids = torch.stack([self._token_cache[p][0] for p in prompts]).to(device)
        mask = torch.stack([self._token_cache[p][1] for p in prompts]).to(device)
        return ids, mask

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask (B,L) -> context (B,L,D), pooled (B,D). Padding positions never influence real ones."""
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (B, L, D)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L): every query sees only real keys
        for layer in self.layers:
            x = layer(x, attn_mask)
        x = self.norm(x)
        weights = mask.to(x.dtype)[..., None]  # (B, L, 1)
        pooled = self.pool((x * weights).sum(1) / weights.sum(1))  # masked mean over real tokens
        return x, pooled
