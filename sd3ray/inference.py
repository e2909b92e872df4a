"""Inference: draw images from a trained model, and load one from a checkpoint directory (local or at a URI such as
s3://...) or an MLflow run id.

`generate` is the one way sd3ray samples: training-time grids, the judge, `jobs/sample.py`, evaluation and the
benchmarks all call it.
"""

from __future__ import annotations

import functools
import re
import tempfile
from pathlib import Path

import torch

from sd3ray.checkpoint import CheckpointError, load_checkpoint
from sd3ray.config import Config, apply_overrides, from_dict, to_dict
from sd3ray.core.flow import resolve_shift
from sd3ray.core.sampling import sample
from sd3ray.data.buckets import parse_size
from sd3ray.data.format import to_uint8
from sd3ray.model import Denoiser
from sd3ray.model.vae import inspect as inspect_vae
from sd3ray.model.vae import uses_vae
from sd3ray.storage import is_uri, redact

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@torch.no_grad()
def generate(model: Denoiser, prompts: list[str], cfg: Config, seed: int, device: torch.device,
             guidance: float | None = None, steps: int | None = None, sampler: str | None = None,
             batch_size: int = 256, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) pictures, one per prompt (decoded by the VAE in latent space); the same seed gives the
    same images. Unset sampler settings, the guidance interval and the guide model (`sample.guide`, autoguidance)
    come from `cfg.sample`. `size` (H, W) is the model-space shape to draw at (latents in latent space; default the
    square model.image_size), which needs SD3's position table for any other shape."""
    m, s = cfg.model, cfg.sample
    guide = load_guide(s.guide, device, m.channels, m.image_size) if s.guide else None
    generator = torch.Generator().manual_seed(seed)
    height, width = size or (m.image_size, m.image_size)
    noise = torch.randn(len(prompts), m.channels, height, width, generator=generator)
    tokens = (height // m.patch_size) * (width // m.patch_size)
    shift = resolve_shift(s.shift, cfg.flow.shift_rule, cfg.flow.shift_reference_tokens, tokens)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        velocity = model.velocity_fn(chunk, s.guidance if guidance is None else guidance, s.guidance_interval, guide)
        x = sample(velocity, noise[start : start + len(chunk)].to(device), steps or cfg.sample.steps,
                   sampler or cfg.sample.sampler, shift)
        out.append(to_uint8(model.to_pictures(x)).cpu())
    return torch.cat(out)


def drawing_size(cfg: Config, text: str) -> tuple[int, int]:
    """'WxH' pictures (width first, as image tools write it) -> the (H, W) the model draws at: the same in pixel
    space, divided by the VAE's factor in latent space; sides must be multiples of the patch (times that factor)."""
    factor = inspect_vae(cfg.vae).factor if uses_vae(cfg.vae) else 1
    height, width = parse_size(text, cfg.model.patch_size * factor)
    if not cfg.model.pos_embed_max_size and (height, width) != (cfg.model.image_size * factor,) * 2:
        raise CheckpointError(f"size {text}: this model knows positions for its square {cfg.model.image_size * factor}"
                              f" px only; other shapes need SD3's position table (model.pos_embed_max_size)")
    return height // factor, width // factor


def with_guidance(cfg: Config, interval: list[float] | None = None, guide: str | None = None,
                  shift: float | str | None = None) -> Config:
    """`cfg` with another guidance interval, guide model or sampling shift (None keeps the run's), validated as any
    config is."""
    sets = ([f"sample.guidance_interval=[{interval[0]}, {interval[1]}]"] if interval is not None else []) + \
        ([f"sample.guide={guide!r}"] if guide is not None else []) + \
        ([f"sample.shift={shift}"] if shift is not None else [])
    return from_dict(apply_overrides(to_dict(cfg), sets)) if sets else cfg


@functools.lru_cache(maxsize=2)
def load_guide(spec: str, device: torch.device, channels: int, image_size: int) -> Denoiser:
    """The guide model of autoguidance: the EMA weights at `spec`, loaded once per process and device. It may be
    smaller than the model it guides, but must draw the same images (channels and size)."""
    try:
        guide, guide_cfg, _ = load_ema_model(spec, device)
    except CheckpointError as err:
        raise CheckpointError(f"sample.guide: {err}. Point it at an earlier checkpoint of the run or a smaller "
                              f"model's, or set sample.guide='' for classifier-free guidance") from None
    drawn = (guide_cfg.model.channels, guide_cfg.model.image_size)
    if drawn != (channels, image_size):
        raise CheckpointError(f"sample.guide {spec} draws {drawn[0]}×{drawn[1]}×{drawn[1]} images, the model "
                              f"{channels}×{image_size}×{image_size}: guide with a model of the same data")
    return guide


def download_folder(uri: str, destination: Path) -> Path:
    """Copy a folder at a URI (s3://bucket/runs/NAME/step_00001000?endpoint_override=...) to `destination`."""
    import pyarrow.fs as pafs

    from sd3ray.storage import location_errors, open_folder

    with location_errors(uri, "read the checkpoint at"):
        fs, root = open_folder(uri)
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            raise CheckpointError(f"--checkpoint {redact(uri)}: no such folder")
        destination.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(root, str(destination), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return destination


def resolve_checkpoint(spec: str, tracking_uri: str = "", scratch: Path | None = None) -> Path:
    """A checkpoint directory as given, one at a URI (copied into `scratch`), the weights of an MLflow model
    (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/MODEL_ID`), or the final checkpoint logged to an MLflow
    run."""
    if spec.startswith("models:/"):
        return model_checkpoint(spec, tracking_uri, scratch)
    if is_uri(spec):
        if scratch is None:
            raise CheckpointError(f"--checkpoint {spec}: a URI needs a scratch folder to copy it to")
        return download_folder(spec, scratch / "checkpoint")
    path = Path(spec)
    if path.exists():
        return path
    if RUN_ID.match(spec):
        import mlflow

        from sd3ray.storage import resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri)
        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=spec, artifact_path="checkpoint", tracking_uri=uri))
        except Exception as exc:
            raise CheckpointError(f"MLflow run {spec} at {uri} has no 'checkpoint' artifact ({exc}); pass a "
                                  f"checkpoint directory instead (see the run's sd3ray.checkpoint_uri tag)") from exc
    raise CheckpointError(f"--checkpoint {spec!r} is neither an existing directory, a URI, nor an MLflow run id")


def model_checkpoint(model_uri: str, tracking_uri: str = "", scratch: Path | None = None) -> Path:
    """The checkpoint inside an MLflow model sd3ray logged (see sd3ray.tracking.pyfunc)."""
    import mlflow

    from sd3ray.storage import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=uri,
                                                    dst_path=str(scratch) if scratch else None)
    except Exception as exc:
        raise CheckpointError(f"--checkpoint {model_uri}: no such model at {redact(uri)} ({str(exc).splitlines()[0]})."
                              f" List them with MlflowClient().search_registered_models(), or pass a run id or a "
                              f"checkpoint directory") from exc
    checkpoint = Path(local) / "artifacts" / "checkpoint"
    if not checkpoint.is_dir():
        raise CheckpointError(f"--checkpoint {model_uri} is not a model sd3ray logged (no artifacts/checkpoint)")
    return checkpoint


def load_ema_model(spec: str, device: torch.device, tracking_uri: str = "") -> tuple[Denoiser, Config, int]:
    """The EMA weights (what samples and evaluation use), its config and training step, from a checkpoint folder,
    a URI of one, or an MLflow run id."""
    with tempfile.TemporaryDirectory(prefix="sd3ray-checkpoint-") as scratch:
        data = load_checkpoint(resolve_checkpoint(spec, tracking_uri, Path(scratch)), map_location=device)
    model = Denoiser(data.config).to(device)
    model.load_state_dict(data.ema)
    return model.eval().requires_grad_(False), data.config, data.step
