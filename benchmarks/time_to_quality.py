"""Time to quality: how good a config's samples are after N minutes of wall clock, measured as a user meets it.

Each budget runs the command a user types (`jobs/train.py --local --max-minutes ...`) in a fresh process, and the
clock runs from launching it to the final checkpoint's last file: start-up, data loading, training, the final
evaluation and the checkpoint all count. The final EMA weights are then judged at the config's own sampler settings.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sd3ray.checkpoint import latest_checkpoint, load_checkpoint
from sd3ray.evaluation.figures import make_grid
from sd3ray.evaluation.judge import Reference, judge_settings
from sd3ray.evaluation.validation import GRID_PROMPTS, GRID_SEED
from sd3ray.inference import generate
from sd3ray.model import Denoiser

TRAIN_JOB = Path(__file__).resolve().parents[1] / "jobs" / "train.py"


def train_command(config: str, name: str, train_minutes: float, output_dir: Path, overrides: list[str],
                  steps: int | None = None) -> list[str]:
    """The user's command, with judging during training off (it would spend the budget) and no tracking: for a
    wall-clock budget of `train_minutes`, or for exactly `steps` optimizer steps (then no budget)."""
    sets = [f"train.output_dir={output_dir}", "eval.num_samples=0", *overrides]
    length = ["--steps", str(steps)] if steps else ["--max-minutes", f"{train_minutes:g}"]
    return [sys.executable, str(TRAIN_JOB), "--local", "--config", config, "--name", name, *length,
            "--no-tracking", *(arg for s in sets for arg in ("--set", s))]


def train_for(config: str, minutes: float, reserve_s: float, output_dir: Path, overrides: list[str],
              label: str, steps: int | None = None) -> tuple[Path, float]:
    """Run one budget (or, with `steps`, one fixed step count); return the final checkpoint and the wall seconds
    from launch to its last file.

    The run gets `minutes` less `reserve_s` as its budget. In local mode that budget already counts from the
    command and keeps time for the final evaluation and checkpoint, so `reserve_s` is only slack for the clock's
    estimate of the last log interval.
    """
    name = f"ttq-{label}-{steps}steps" if steps else f"ttq-{label}-{minutes:g}min"
    command = train_command(config, name, minutes - reserve_s / 60, output_dir, overrides, steps)
    print("$ " + " ".join(command), flush=True)
    launched = time.time()
    subprocess.run(command, check=True)
    checkpoint = latest_checkpoint(output_dir / name / "checkpoints")
    if checkpoint is None:
        raise RuntimeError(f"{name} finished without a checkpoint")
    last_write = max(path.stat().st_mtime for path in checkpoint.iterdir())
    return checkpoint, last_write - launched


def judge_checkpoint(checkpoint: Path, reference: Reference, num_samples: int,
                     device: torch.device) -> tuple[dict[str, Any], np.ndarray]:
    """Prompt accuracy and classifier-FID of the checkpoint's EMA weights at its config's sampler settings, and the
    sample grid the training run logs (the same prompts and seed)."""
    data = load_checkpoint(checkpoint, map_location=device)
    model = Denoiser(data.config).to(device)
    model.load_state_dict(data.ema)
    model.eval().requires_grad_(False)
    cfg = data.config
    (row,) = judge_settings(model, cfg, reference, [cfg.sample.guidance], [cfg.sample.steps], num_samples)
    grid = make_grid(generate(model, list(GRID_PROMPTS), cfg, GRID_SEED, device))
    return {"step": data.step, "train_seconds": data.meta.get("train_seconds", float("nan")),
            "images_seen": data.meta.get("samples_seen", 0), **row}, grid


def budget_label(row: dict[str, Any]) -> str:
    return f"{row['budget_steps']} steps" if row.get("budget_steps") else f"{row['budget_minutes']:g} min"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setup | budget | command to checkpoint (min) | steps | images/s | prompt acc | cFID | floor | "
             "cFID/floor | diversity (real) |", "|" + "---|" * 10]
    for r in rows:
        seed = f" (seed {r['seed']})" if r.get("seed") is not None else ""
        lines.append(f"| {r['label']}{seed} | {budget_label(r)} | {r['wall_minutes']:.2f} | {r['step']} | "
                     f"{r['images_seen'] / r['train_seconds']:.0f} | {r['samples/accuracy']:.3f} | "
                     f"{r['val/cfid']:.2f} | {r['val/cfid_floor']:.2f} | {r['samples/cfid_ratio']:.2f} | "
                     f"{r['samples/diversity']:.2f} ({r['val/diversity_real']:.2f}) |")
    return "\n".join(lines) + "\n"


SPREAD_KEYS = ("samples/accuracy", "val/cfid", "samples/cfid_ratio")


def seed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setup and budget over its seeds: the mean and the sample standard deviation (n − 1; 0 for one
    seed) of accuracy, cFID and cFID/floor. A lever counts only where its gain over another setup exceeds these
    spreads."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["label"], budget_label(r)), []).append(r)
    summary = []
    for (label, budget), members in groups.items():
        row: dict[str, Any] = {"label": label, "budget": budget, "seeds": len(members),
                               "step": members[0]["step"]}
        for key in SPREAD_KEYS:
            values = np.array([m[key] for m in members], dtype=float)
            row[key] = float(values.mean())
            row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def summary_table(summary: list[dict[str, Any]]) -> str:
    lines = ["| setup | budget | seeds | prompt acc (mean ± std) | cFID (mean ± std) | cFID/floor (mean ± std) |",
             "|" + "---|" * 6]
    for r in summary:
        lines.append(f"| {r['label']} | {r['budget']} | {r['seeds']} | {r['samples/accuracy']:.3f} ± "
                     f"{r['samples/accuracy_std']:.3f} | {r['val/cfid']:.2f} ± {r['val/cfid_std']:.2f} | "
                     f"{r['samples/cfid_ratio']:.2f} ± {r['samples/cfid_ratio_std']:.2f} |")
    return "\n".join(lines) + "\n"


def ttq_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The figures as flat MLflow metric names, one prefix per setup and budget."""
    metrics = {}
    for r in rows:
        prefix = f"ttq/{r['label']}/" + (f"{r['budget_steps']}steps" if r.get("budget_steps")
                                          else f"{r['budget_minutes']:g}min") + \
            (f"/seed{r['seed']}" if r.get("seed") is not None else "")
        metrics.update({f"{prefix}/wall_minutes": r["wall_minutes"], f"{prefix}/steps": float(r["step"])})
        metrics.update({f"{prefix}/{key.split('/')[-1]}": r[key] for key in
                        ("samples/accuracy", "val/cfid", "val/cfid_floor", "samples/cfid_ratio")})
    return metrics
