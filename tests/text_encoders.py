"""Tiny randomly initialised CLIP and T5 text encoders with their tokenizers, saved with `save_pretrained` as real
ones are: the pretrained-encoder path runs offline on them exactly as on CLIP-L/G and T5-XXL folders."""

from __future__ import annotations

from pathlib import Path

# every word of the colour shapes' captions and of digit prompts; anything else is [UNK]
WORDS = ("a an the red green blue yellow circle square triangle cross small large big on in at of left right top "
         "bottom centre center middle upper lower corner side 0 1 2 3 4 5 6 7 8 9 zero one two three four five six "
         "seven eight nine digit number handwritten").split()


def make_clip(folder: Path, width: int = 24, projection: int = 20, seed: int = 0, max_length: int = 16) -> Path:
    """A 2-layer CLIPTextModelWithProjection with a word-level tokenizer (BOS … EOS, padded with EOS as CLIP is)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "[UNK]": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="[UNK]",
                                        model_max_length=max_length)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=4, projection_dim=projection,
                            max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_t5(folder: Path, width: int = 32, seed: int = 1) -> Path:
    """A 2-layer T5EncoderModel with the ByT5 tokenizer (UTF-8 bytes: no vocabulary file)."""
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=384, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4)
    T5EncoderModel(config).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return folder


def make_encoders(root: Path) -> tuple[Path, Path, Path]:
    """Two CLIPs of different widths (as CLIP-L and CLIP-G) and a T5, under root."""
    return (make_clip(root / "clip_l", width=24, projection=20, seed=0),
            make_clip(root / "clip_g", width=16, projection=12, seed=2),
            make_t5(root / "t5", width=32, seed=1))
