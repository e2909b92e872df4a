"""Prompts and their tokens: the byte tokenizer, digit prompt renderings and the prompt bank.

The text encoder's weights live in `sd3ray.model.text_encoder`; this module holds no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sd3ray.model.tokenizer import tokenize

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Each MNIST image is prompted by one of these, drawn at random per step. The bare numeral and word appear twice
# so that half the prompts are the seed's plain "7" / "seven"; the rest are natural phrasings.
NUMERAL_TEMPLATES = ("{n}", "{n}", "a handwritten {n}", "the number {n}")
WORD_TEMPLATES = ("{w}", "{w}", "the digit {w}", "a handwritten {w}")


def digit_prompts(label: int) -> list[str]:
    """Every prompt an image of `label` may be trained with: numeral forms first, then word forms."""
    n, w = str(label), DIGIT_WORDS[label]
    return [t.format(n=n) for t in NUMERAL_TEMPLATES] + [t.format(w=w) for t in WORD_TEMPLATES]



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
    def build(cls, prompts: list[str], max_length: int) -> PromptBank:
        unique = [""] + [p for p in dict.fromkeys(prompts) if p != ""]
        ids, mask = tokenize(unique, max_length)
        longest = int(mask.sum(1).max())  # trim shared padding: attention cost grows with the token count
        return cls(unique, ids[:, :longest], mask[:, :longest])

    def to(self, device: torch.device | str) -> PromptBank:
        return PromptBank(self.prompts, self.ids.to(device), self.mask.to(device))
