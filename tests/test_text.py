import pytest
import torch

from sd3ray.config import TextConfig
from sd3ray.text import (
    BOS_ID,
    PromptBank,
    TextEncoder,
    detokenize,
    digit_prompts,
    is_word_prompt,
    prompt_digit,
    tokenize,
)


@pytest.mark.parametrize("prompt", ["7", "seven", "", "数字七 ✍️", "ÿ\u0000\n", "a handwritten 7"])
def test_byte_tokenizer_round_trips_any_unicode(prompt: str) -> None:
    ids, mask = tokenize([prompt], max_length=64)
    assert ids[0, 0] == BOS_ID
    assert mask[0].sum() == 1 + len(prompt.encode("utf-8"))
    assert detokenize(ids) == [prompt]


def test_overlong_prompt_is_truncated_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = tokenize(["x" * 100], max_length=8)
    assert ids.shape == (1, 8) and bool(mask.all())


def test_digit_prompts_cover_numeral_and_word_forms() -> None:
    prompts = digit_prompts(7)
    assert "7" in prompts and "seven" in prompts and "the digit seven" in prompts and "a handwritten 7" in prompts
    assert all(prompt_digit(p) == 7 for p in prompts)
    assert sum(is_word_prompt(p) for p in prompts) == len(prompts) // 2
    assert prompt_digit("") is None and prompt_digit("1 and 2") is None


def test_prompt_bank_puts_the_empty_prompt_first() -> None:
    bank = PromptBank.build(["7", "seven", "7"], max_length=8)
    assert bank.prompts == ["", "7", "seven"] and bank.ids.shape == (3, 6)  # trimmed to BOS + "seven"


def test_encoder_shapes_and_padding_independence() -> None:
    enc = TextEncoder(TextConfig(width=32, depth=2, num_heads=4, max_length=16)).eval()
    context, pooled, mask = enc(["seven", "a handwritten 7"])
    assert context.shape == (2, 16, 32) and pooled.shape == (2, 32) and mask.shape == (2, 16)
    # The same prompt padded to 16 or to 24 positions must give the same real tokens and pooled vector.
    long_enc = TextEncoder(TextConfig(width=32, depth=2, num_heads=4, max_length=24)).eval()
    ids, mask = tokenize(["seven"], 16)
    longer_ids, longer_mask = tokenize(["seven"], 24)
    ctx_a, pooled_a = long_enc.encode(ids, mask)
    ctx_b, pooled_b = long_enc.encode(longer_ids, longer_mask)
    real = mask[0]
    torch.testing.assert_close(ctx_a[0, real], ctx_b[0, :16][real])
    torch.testing.assert_close(pooled_a, pooled_b)
