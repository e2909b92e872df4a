"""The byte-level tokenizer of the default text encoder: a prompt's UTF-8 bytes, shifted past PAD and BOS, so any
text encodes with no vocabulary file.
"""

from __future__ import annotations

import warnings

import torch

PAD_ID = 0
BOS_ID = 1  # every prompt starts with BOS, so even the empty prompt has one real token to attend to
BYTE_OFFSET = 2
VOCAB_SIZE = 256 + BYTE_OFFSET


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

