"""Load a trained model for sampling or evaluation, from a checkpoint directory or an MLflow run id."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sd3ray.checkpoint import CheckpointError, load_checkpoint
from sd3ray.config import Config
from sd3ray.model import Denoiser
from sd3ray.tracking import resolve_tracking_uri

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_checkpoint(spec: str, tracking_uri: str = "") -> Path:
    """A checkpoint directory as given, or the final checkpoint logged to an MLflow run."""
    path = Path(spec)
    if path.exists():
        return path
    if RUN_ID.match(spec):
        import mlflow

        uri = resolve_tracking_uri(tracking_uri)
        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=spec, artifact_path="checkpoint", tracking_uri=uri))
        except Exception as exc:
            raise CheckpointError(f"MLflow run {spec} at {uri} has no 'checkpoint' artifact ({exc}); pass a "
                                  f"checkpoint directory instead (see the run's sd3ray.checkpoint_uri tag)") from exc
    raise CheckpointError(f"--checkpoint {spec!r} is neither an existing directory nor an MLflow run id")


def load_ema_model(spec: str, device: torch.device, tracking_uri: str = "") -> tuple[Denoiser, Config, int]:
    """The EMA weights (what samples and evaluation use), its config and training step."""
    data = load_checkpoint(resolve_checkpoint(spec, tracking_uri), map_location=device)
    model = Denoiser(data.config).to(device)
    model.load_state_dict(data.ema)
    return model.eval().requires_grad_(False), data.config, data.step
