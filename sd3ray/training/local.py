"""Local mode: the loop in this process, on the GPU when there is one."""

from __future__ import annotations

from pathlib import Path

import torch

from sd3ray.config import Config
from sd3ray.data.prepare import prepare_dataset
from sd3ray.tracking.mlflow_tracker import make_tracker, review_hint
from sd3ray.training.context import LocalContext, default_device, process_launched_at, resolve_run_dir
from sd3ray.training.loop import TrainResult, train
from sd3ray.training.run_folder import Claim, checkpoints_of, claim, finish
from sd3ray.training.run_lock import run_lock
from sd3ray.training.signals import stop_on_signals


def run_local(cfg: Config, name: str | None, default_name: str, resume: str | None = None,
              device: str | None = None, tracking: bool = True) -> TrainResult:
    """`name` is the user's run name (None when not given); `--resume latest` without one picks the newest run."""
    run_dir = resolve_run_dir(resume, Path(cfg.train.output_dir), name, default_name)
    # the user's clock runs from the command: a time budget includes start-up and data loading
    with run_lock(run_dir), stop_on_signals() as stop:  # a second run of the same name stops here
        run, resume_path = claim_local(run_dir, resume, cfg.train.steps)
        prepare_dataset(cfg)
        ctx = LocalContext(run_dir, torch.device(device) if device else default_device(), resume_path,
                           keep=cfg.train.keep_checkpoints, launched_at=process_launched_at(), stop=stop,
                           run_id=run.record.run_id)
        result = train(cfg, ctx, make_tracker(cfg, enabled=tracking))
        finish(str(run_dir), run.record, result.step)
    print(f"sd3ray: done at step {result.step}; checkpoint {result.checkpoint}; MLflow run {result.run_id}")
    if result.run_id:
        print(review_hint(cfg.tracking.uri, result.run_id), flush=True)
    return result


def claim_local(run_dir: Path, resume: str | None, steps: int) -> tuple[Claim, Path | None]:
    """The folder's run (sd3ray.training.run_folder) and the checkpoint to continue it from: `--resume PATH` as
    given, else the newest checkpoint that run wrote (None for a new run, or one stopped before its first save)."""
    root = run_dir / "checkpoints"
    run = claim(str(run_dir), run_dir.name, resume is not None, steps, checkpoints_at=str(root),
                from_path=resume not in (None, "latest"))
    if run.line:
        print(f"sd3ray: {run.line}", flush=True)
    if resume is not None and resume != "latest":
        return run, Path(resume)
    mine = checkpoints_of(root, run.record.run_id) if run.continues else []
    return run, mine[-1] if mine else None
