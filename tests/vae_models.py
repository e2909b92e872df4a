"""Tiny randomly initialised diffusers `AutoencoderKL`s, built from config dicts and saved with `save_pretrained`
as SD3's is: sd3ray loads them offline exactly as it would SD3's `vae` folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_vae_config(**overrides: Any) -> dict[str, Any]:
    """4× downsampling (three blocks), 4 latent channels, SD3's shift and a scaling far from 1, so a formula that
    forgets either is caught."""
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 8, 8],
            "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
            "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 1.5305,
            "shift_factor": 0.0609, **overrides}


def make_vae(folder: Path, config: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """Save an AutoencoderKL of `config` (tiny_vae_config by default) with seeded random weights; returns the folder."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**(config or tiny_vae_config())).save_pretrained(folder, safe_serialization=True)
    return folder
