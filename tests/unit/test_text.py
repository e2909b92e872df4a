from functools import partial

import pytest

from sd3ray.data.prompts import PromptBank, digit_prompts, is_word_prompt
from sd3ray.model.tokenizer import BOS_ID, BYTE_OFFSET, tokenize


@pytest.mark.parametrize("prompt", ["7", "seven", "", "数字七 ✍️", "ÿ\u0000\n", "a handwritten 7"])
def test_byte_tokenizer_round_trips_any_unicode(prompt: str) -> None:
    ids, mask = tokenize([prompt], max_length=64)
    assert ids[0, 0] == BOS_ID
    assert mask[0].sum() == 1 + len(prompt.encode("utf-8"))
    assert bytes(i - BYTE_OFFSET for i in ids[0].tolist() if i >= BYTE_OFFSET).decode("utf-8") == prompt


def test_overlong_prompt_is_truncated_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = tokenize(["x" * 100], max_length=8)
    assert ids.shape == (1, 8) and bool(mask.all())


def test_digit_prompts_cover_numeral_and_word_forms() -> None:
    prompts = digit_prompts(7)
    assert "7" in prompts and "seven" in prompts and "the digit seven" in prompts and "a handwritten 7" in prompts
    assert all(("7" in p) != ("seven" in p) for p in prompts)  # each names the digit once, as numeral or word
    assert sum(is_word_prompt(p) for p in prompts) == len(prompts) // 2


def test_prompt_bank_puts_the_empty_prompt_first() -> None:
    bank = PromptBank.build(["7", "seven", "7"], partial(tokenize, max_length=8))
    assert bank.prompts == ["", "7", "seven"] and bank.ids.shape == (3, 6)  # trimmed to BOS + "seven"
