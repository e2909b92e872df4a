"""Prompts and their tokens: the byte tokenizer, digit prompt renderings and the prompt bank.

The text encoder's weights live in `sd3ray.model.text_encoder`; this module holds no parameters.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

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
