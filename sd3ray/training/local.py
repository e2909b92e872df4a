"""Local mode: the loop in this process, on the GPU when there is one."""

from __future__ import annotations

from pathlib import Path

import torch

from sd3ray.config import Config
from sd3ray.data.prepare import prepare_dataset
from sd3ray.tracking.mlflow_tracker import make_tracker, review_hint
from sd3ray.training.context import LocalContext, default_device, process_launched_at, resolve_resume
from sd3ray.training.loop import TrainResult, train
from sd3ray.training.run_lock import run_lock
from sd3ray.training.signals import stop_on_signals


def run_local(cfg: Config, name: str | None, default_name: str, resume: str | None = None,
              device: str | None = None, tracking: bool = True) -> TrainResult:
    """`name` is the user's run name (None when not given); `--resume latest` without one picks the newest run."""
    prepare_dataset(cfg)
    output_dir = Path(cfg.train.output_dir)
    resume_path = resolve_resume(resume, output_dir, name)
    # a resumed run keeps writing next to the checkpoint it came from
    run_dir = resume_path.parent.parent if resume_path is not None else output_dir / (name or default_name)
    # the user's clock runs from the command: a time budget includes start-up and data loading
    with run_lock(run_dir), stop_on_signals() as stop:  # a second run of the same name stops here
        ctx = LocalContext(run_dir, torch.device(device) if device else default_device(), resume_path,
                           keep=cfg.train.keep_checkpoints, launched_at=process_launched_at(), stop=stop)
        result = train(cfg, ctx, make_tracker(cfg, enabled=tracking))
    print(f"sd3ray: done at step {result.step}; checkpoint {result.checkpoint}; MLflow run {result.run_id}")
    if result.run_id:
        print(review_hint(cfg.tracking.uri, result.run_id), flush=True)
    return result
