"""Prompts and their tokens: digit prompt renderings and the prompt bank.

The text encoder's weights live in `sd3ray.model.text_encoder`; this module holds no parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from sd3ray.config import TextConfig
from sd3ray.model.tokenizer import tokenize

# prompts -> token ids (B, L) and mask (B, L) bool: the byte tokenizer, or a pretrained encoder's cache rows
Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Each MNIST image is prompted by one of these, drawn at random per step. The bare numeral and word appear twice
# so that half the prompts are the seed's plain "7" / "seven"; the rest are natural phrasings.
NUMERAL_TEMPLATES = ("{n}", "{n}", "a handwritten {n}", "the number {n}")
WORD_TEMPLATES = ("{w}", "{w}", "the digit {w}", "a handwritten {w}")


def digit_prompts(label: int) -> list[str]:
    """Every prompt an image of `label` may be trained with: numeral forms first, then word forms."""
    n, w = str(label), DIGIT_WORDS[label]
    return [t.format(n=n) for t in NUMERAL_TEMPLATES] + [t.format(w=w) for t in WORD_TEMPLATES]



def default_tokenize(cfg: TextConfig) -> Tokenize:
    """The byte tokenizer at `text.max_length`; a pretrained encoder's tokenize must be passed instead."""
    if tuple(cfg.encoder) != ("byte",):
        raise ValueError("pretrained text encoders tokenize through the model: pass model.text_encoder.tokenize")
    return partial(tokenize, max_length=cfg.max_length)


def is_word_prompt(prompt: str) -> bool:
    return not any(ch.isdigit() for ch in prompt)


@dataclass
class PromptBank:
    """A fixed set of prompts tokenised once; training gathers rows by index on the device instead of
    re-tokenising strings every step. Row 0 is always the empty prompt (used for prompt dropout and CFG)."""

    prompts: list[str]
    ids: torch.Tensor  # (P, L) long
    mask: torch.Tensor  # (P, L) bool

    @classmethod
    def build(cls, prompts: list[str], tokenize: Tokenize) -> PromptBank:
        unique = [""] + [p for p in dict.fromkeys(prompts) if p != ""]
        ids, mask = tokenize(unique)
        # trim the padding every row shares (attention cost grows with the token count): past the last real token
        positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
        longest = int((mask * positions).max())
        return cls(unique, ids[:, :longest], mask[:, :longest])

    def to(self, device: torch.device | str) -> PromptBank:
        return PromptBank(self.prompts, self.ids.to(device), self.mask.to(device))
