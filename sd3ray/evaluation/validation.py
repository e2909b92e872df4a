"""What the loop measures on held-out data every eval interval: the fixed-t validation loss, and the fixed prompts
and seed of the sample grid, so grids compare across steps and runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sd3ray.config import Config
from sd3ray.core.flow import fixed_t_validation_loss, validation_levels
from sd3ray.data.format import ImageSet, to_model_space
from sd3ray.model import Denoiser

# The seed's grid, row by row: numerals and words mixed so one glance shows both kinds of prompt.
GRID_PROMPTS: tuple[str, ...] = tuple(
    " ".join([
        "1 zero 1 9 five seven 1 0",
        "zero seven 7 2 5 7 1 five",
        "3 6 8 four two seven 1 2",
        "nine eight 9 1 nine four 7 three",
        "four three 4 two 5 zero eight 7",
        "four 6 2 4 9 0 0 one",
        "six 2 2 5 1 zero two seven",
        "eight 2 8 two 2 three zero five",
    ]).split()
)
GRID_SEED = 1234
VAL_SEED = 4321


@dataclass
class ValidationSet:
    """Held-out images with their noise and prompts fixed once."""

    x0: torch.Tensor  # (N, C, H, W) in [-1, 1]
    eps: torch.Tensor  # (N, C, H, W)
    prompts: list[str]
    levels: torch.Tensor  # (K,)
    grid_prompts: list[str]  # the sample grid's prompts, row by row
    # (H, W) shapes drawn beside the square grid, one grid each (an aspect-ratio bucketed set's largest buckets)
    grid_shapes: list[tuple[int, int]] = field(default_factory=list)

    @classmethod
    def build(cls, images: ImageSet, cfg: Config, device: torch.device) -> ValidationSet:
        n = min(cfg.data.num_val_images, len(images))
        x0 = to_model_space(images.images[:n]).to(device)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(VAL_SEED)).to(device)
        if images.captions is not None:
            prompts = [c or "" for c in images.captions[:n]]
        else:
            prompts = [str(int(label)) for label in images.labels[:n]]
        return cls(x0, eps, prompts, validation_levels(cfg.flow.num_val_levels), grid_prompts(images))


def grid_prompts(images: ImageSet) -> list[str]:
    """Digits: the fixed grid above. A captioned set: the held-out split's first 64 captions, so the grid asks for
    what the data describes."""
    if images.captions is None:
        return list(GRID_PROMPTS)
    captions = [c or "" for c in images.captions[:len(GRID_PROMPTS)]]
    return (captions * (len(GRID_PROMPTS) // max(1, len(captions)) + 1))[:len(GRID_PROMPTS)]


@torch.no_grad()
def validation_losses(model: Denoiser, val: ValidationSet, batch_size: int = 256) -> dict[str, float]:
    """Loss per fixed t level (averaged over the set) and their mean."""
    totals = torch.zeros(len(val.levels), device=val.x0.device)
    for start in range(0, len(val.prompts), batch_size):
        stop = min(start + batch_size, len(val.prompts))
        velocity = model.velocity_fn(val.prompts[start:stop])
        losses = fixed_t_validation_loss(velocity, val.x0[start:stop], val.eps[start:stop], val.levels)
        totals += losses * (stop - start)
    per_level = (totals / len(val.prompts)).tolist()
    metrics = {f"val/loss_t{level:.3f}": loss for level, loss in zip(val.levels.tolist(), per_level)}
    metrics["loss/val"] = sum(per_level) / len(per_level)
    return metrics
