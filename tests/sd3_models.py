"""Tiny randomly initialised diffusers `SD3Transformer2DModel`s, built from config dicts and saved with
`save_pretrained` as the real ones are: sd3ray imports them offline exactly as it would SD3 Medium's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# the micro model's shape (tests.support.MICRO over configs/mnist_tiny.yaml) as a diffusers config: width 32 =
# 2 heads of 16, patch 4 on 32×32 single-channel images, a position table of 10×10 centre-cropped to the 8×8 grid
MICRO_SD3 = {"sample_size": 32, "patch_size": 4, "in_channels": 1, "out_channels": 1, "num_layers": 2,
             "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
             "caption_projection_dim": 32, "pooled_projection_dim": 32, "pos_embed_max_size": 10,
             "qk_norm": "rms_norm", "dual_attention_layers": ()}
# what sd3ray needs to be told about it beyond MICRO (the rest of MICRO already agrees)
MICRO_SD3_SETS = ["model.pos_embed_max_size=10"]
# SD3 Medium, SD3.5 Large and SD3.5 Medium in miniature: what tells them apart is QK-norm and dual attention
VARIANTS = {
    "sd3-medium": {"qk_norm": None, "dual_attention_layers": ()},
    "sd3.5-large": {"qk_norm": "rms_norm", "dual_attention_layers": ()},
    "sd3.5-medium": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 2)},
}


def tiny_sd3_config(**overrides: Any) -> dict[str, Any]:
    """A 3-block, 4-channel latent-space SD3 transformer (width 32, context 24, pooled 20), cropping its 6×6 table."""
    return {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 3,
            "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 24,
            "caption_projection_dim": 32, "pooled_projection_dim": 20, "pos_embed_max_size": 6, **overrides}


def make_sd3(folder: Path, config: dict[str, Any], seed: int = 0, std: float = 0.1) -> Path:
    """Save an SD3Transformer2DModel of `config` with every weight random (its own init zeroes the output layer
    and would hide a wrong mapping there); returns the folder."""
    import torch
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(**config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(folder)
    return folder


def diffusers_velocity(model, x, t, context, pooled):
    """diffusers' forward at sd3ray's t ∈ [0, 1]: its `timestep` is t·1000 (sigma = t)."""
    return model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t * 1000).sample
