"""What people look at: image grids, PNG files, and the pictures for MLflow (confusion matrices and metric curves,
rendered off-screen with matplotlib)."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@cache
def pyplot() -> Any:
    """matplotlib.pyplot, off-screen, imported on first use: every worker and job imports this module for its grids,
    and most never draw a plot (pyplot's import costs ~0.6 s of CPU per process)."""
    # matplotlib builds its font cache on a machine's first import and says so ("generated new fontManager") in a
    # line that reads like a problem on the training console; it is nothing the user needs to act on
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt

    return plt


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


def figure_to_array(fig: Figure) -> np.ndarray:
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    pyplot().close(fig)
    return image


def confusion_image(confusion: np.ndarray, title: str = "") -> np.ndarray:
    """(10, 10) counts, rows = prompted digit, columns = judged digit -> RGB uint8 image."""
    fig, ax = pyplot().subplots(figsize=(4.2, 4), dpi=100)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(10):
        for j in range(10):
            if confusion[i, j]:
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="judged digit", ylabel="prompted digit",
           title=f"confusion {title}".strip())
    fig.tight_layout()
    return figure_to_array(fig)


def line_plot(series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
              title: str = "", logx: bool = False) -> np.ndarray:
    """One line per series name: {label: (xs, ys)} -> RGB uint8 image."""
    fig, ax = pyplot().subplots(figsize=(5, 3.5), dpi=100)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_to_array(fig)


def bar_plot(values: dict[str, float], ylabel: str, title: str = "",
             errors: dict[str, float] | None = None) -> np.ndarray:
    """One labelled bar per entry, value printed on top, with ± `errors` bars when given: {label: value} -> RGB
    uint8 image."""
    fig, ax = pyplot().subplots(figsize=(1.2 * len(values) + 2, 3.5), dpi=100)
    yerr = [errors.get(k, 0.0) for k in values] if errors else None
    bars = ax.bar(list(values), list(values.values()), color="tab:blue", yerr=yerr, capsize=4 if errors else 0)
    ax.bar_label(bars, fmt="%.3g", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    return figure_to_array(fig)
