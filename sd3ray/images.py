"""Image grids and PNG files: what people look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 (N, C, H, W) -> (rows·(H+p)+p, nrow·(W+p)+p, 3) uint8, images laid out row by row."""
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, 3), pad_value, np.uint8)
    pixels = images.detach().cpu().numpy()
    if c == 1:
        pixels = np.repeat(pixels, 3, axis=1)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i].transpose(1, 2, 0)
    return grid


def save_png(image: np.ndarray, path: Path, scale: int = 1) -> Path:
    picture = Image.fromarray(image)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
