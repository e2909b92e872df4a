"""Prompts and the byte-level text encoder.

SD3 conditions on frozen CLIP and T5. Neither can be fetched offline and both are far larger than digits need,
so sd3ray trains a small transformer over UTF-8 bytes jointly with the MM-DiT: no vocabulary file, any text
encodes. It returns what the MM-DiT consumes: token embeddings for joint attention, a pooled vector for the
adaLN modulation, and a padding mask.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd3ray.config import TextConfig

PAD_ID = 0
BOS_ID = 1  # every prompt starts with BOS, so even the empty prompt has one real token to attend to
BYTE_OFFSET = 2
VOCAB_SIZE = 256 + BYTE_OFFSET

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Each MNIST image is prompted by one of these, drawn at random per step. The bare numeral and word appear twice
# so that half the prompts are the seed's plain "7" / "seven"; the rest are natural phrasings.
NUMERAL_TEMPLATES = ("{n}", "{n}", "a handwritten {n}", "the number {n}")
WORD_TEMPLATES = ("{w}", "{w}", "the digit {w}", "a handwritten {w}")


def digit_prompts(label: int) -> list[str]:
    """Every prompt an image of `label` may be trained with: numeral forms first, then word forms."""
    n, w = str(label), DIGIT_WORDS[label]
    return [t.format(n=n) for t in NUMERAL_TEMPLATES] + [t.format(w=w) for t in WORD_TEMPLATES]


def prompt_digit(prompt: str) -> int | None:
    """The digit a prompt asks for (its numeral or word), or None if it names none or several."""
    found = {i for i, w in enumerate(DIGIT_WORDS) if w in prompt.lower().split()}
    found |= {int(ch) for ch in prompt if ch.isdigit()}
    return found.pop() if len(found) == 1 else None


def is_word_prompt(prompt: str) -> bool:
    return not any(ch.isdigit() for ch in prompt)


def tokenize(prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes -> ids (B, max_length) long and mask (B, max_length) bool (True = real token).

    Prompts longer than `max_length - 1` bytes are truncated with a warning rather than failing.
    """
    ids = torch.full((len(prompts), max_length), PAD_ID, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        data = prompt.encode("utf-8")
        if len(data) > max_length - 1:
            warnings.warn(f"prompt of {len(data)} bytes truncated to {max_length - 1} (text.max_length={max_length}): "
                          f"{prompt[:40]!r}...", stacklevel=2)
            data = data[: max_length - 1]
        ids[row, 0] = BOS_ID
        ids[row, 1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.long) + BYTE_OFFSET
    return ids, ids != PAD_ID


def detokenize(ids: torch.Tensor) -> list[str]:
    """Inverse of `tokenize` for untruncated prompts (invalid UTF-8 from truncation is replaced)."""
    out = []
    for row in ids.tolist():
        data = bytes(i - BYTE_OFFSET for i in row if i >= BYTE_OFFSET)
        out.append(data.decode("utf-8", errors="replace"))
    return out


@dataclass
class PromptBank:
    """A fixed set of prompts tokenised once; training gathers rows by index on the device instead of
    re-tokenising strings every step. Row 0 is always the empty prompt (used for prompt dropout and CFG)."""

    prompts: list[str]
    ids: torch.Tensor  # (P, L) long
    mask: torch.Tensor  # (P, L) bool

    @classmethod
    def build(cls, prompts: list[str], max_length: int) -> PromptBank:
        unique = [""] + [p for p in dict.fromkeys(prompts) if p != ""]
        ids, mask = tokenize(unique, max_length)
        longest = int(mask.sum(1).max())  # trim shared padding: attention cost grows with the token count
        return cls(unique, ids[:, :longest], mask[:, :longest])

    def to(self, device: torch.device | str) -> PromptBank:
        return PromptBank(self.prompts, self.ids.to(device), self.mask.to(device))


class _EncoderLayer(nn.Module):
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
    """Byte transformer: forward(list[str]) -> context (B,L,D), pooled (B,D), mask (B,L) bool."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(VOCAB_SIZE, cfg.width, padding_idx=PAD_ID)
        self.position_embedding = nn.Parameter(torch.randn(cfg.max_length, cfg.width) * 0.02)
        self.layers = nn.ModuleList(_EncoderLayer(cfg.width, cfg.num_heads) for _ in range(cfg.depth))
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

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask (B,L) -> context (B,L,D), pooled (B,D). Padding positions never influence real ones."""
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]  # (B, L, D)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L): every query sees only real keys
        for layer in self.layers:
            x = layer(x, attn_mask)
        x = self.norm(x)
        weights = mask.to(x.dtype)[..., None]  # (B, L, 1)
        pooled = self.pool((x * weights).sum(1) / weights.sum(1))  # masked mean over real tokens
        return x, pooled

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        context, pooled = self.encode(ids, mask)
        return context, pooled, mask
