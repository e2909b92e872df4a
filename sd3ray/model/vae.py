"""The frozen autoencoder of latent diffusion (SD3 §2, §5.2): images are encoded once into its latents, the MM-DiT
denoises those, and what a person looks at is decoded back to pixels.

SD3 normalises its VAE's latents to roughly unit variance before the flow sees them:

    latent = (z − shift_factor) · scaling_factor          z = the encoder's posterior mode (its mean)
    z      = latent / scaling_factor + shift_factor       before decoding

with both factors read from the VAE's own config.json (SD3's: 16 channels, scaling 1.5305, shift 0.0609; a config
without `shift_factor`, as SD1/SDXL VAEs, shifts by 0; one without `scaling_factor` uses diffusers' default 0.18215).

The VAE never trains and is never a parameter of anything: `FrozenVae` holds it outside `nn.Module` registration,
so the optimizer, DDP/FSDP, the EMA and checkpoints never see it. Its weights load lazily, on the device of the
first tensors it is asked to encode or decode, from safetensors only (nothing loaded from a file runs code).
A checkpoint records the VAE's source and a content hash; another VAE is refused (`sd3ray.checkpoint`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sd3ray.config import ConfigError, ModelConfig, VaeConfig
from sd3ray.errors import Sd3rayError
from sd3ray.model.pretrained_text import folder_hash

DIFFUSERS_CLASS = "AutoencoderKL"
DEFAULT_SCALING = 0.18215  # diffusers' AutoencoderKL default, for configs that predate the key


class VaeError(Sd3rayError):
    """The VAE is missing, not an AutoencoderKL, unreachable, or not the one a checkpoint or latent cache used."""


@dataclass(frozen=True)
class VaeSpec:
    """A VAE as found on disk, read from its config.json without loading its weights."""

    source: str  # as the user gave it: a folder or a hub id (+ vae.subfolder)
    folder: Path  # where its config.json and weights are
    in_channels: int  # picture channels it encodes
    out_channels: int  # picture channels it decodes to
    latent_channels: int
    factor: int  # pixels per latent, per side: 2^(number of down blocks − 1)
    scaling_factor: float
    shift_factor: float
    sha256: str  # content hash of its config and weights (16 hex)

    def latent_size(self, image_size: int) -> int:
        return image_size // self.factor

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint, a latent cache and a logged model record of the VAE."""
        return {"source": self.source, "sha256": self.sha256, "latent_channels": self.latent_channels,
                "factor": self.factor, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}


def uses_vae(cfg: VaeConfig) -> bool:
    return cfg.source != "none"


def picture_shape(model: ModelConfig, cfg: VaeConfig) -> tuple[int, int]:
    """(channels, side) of the pictures a model draws: its own in pixel space, the VAE's decoding of its latents."""
    if not uses_vae(cfg):
        return model.channels, model.image_size
    spec = inspect(cfg)
    return spec.out_channels, model.image_size * spec.factor


def locate(cfg: VaeConfig) -> Path:
    """The folder holding the VAE's config.json: `source[/subfolder]` on this machine, or a hub id's subfolder from
    the local cache, else downloaded (config and safetensors only)."""
    source, sub = cfg.source, cfg.subfolder
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:  # hub ids are ORG/NAME
        folder = path / sub if sub else path
        if (folder / "config.json").is_file():
            return folder
        what = "is not a folder on this machine" if not folder.is_dir() else "holds no config.json"
        hint = "" if sub else " (a pipeline folder: add --set vae.subfolder=vae)"
        raise VaeError(f"vae.source: {folder} {what}{hint}; name a diffusers {DIFFUSERS_CLASS} folder (one written "
                       f"by save_pretrained, e.g. SD3's `vae` subfolder). Fetch one where there is network with "
                       f"`hf download ORG/NAME --include '{sub or 'vae'}/*' --local-dir DIR`")
    return _hub_folder(source, sub)


def _hub_folder(repo: str, sub: str) -> Path:
    from huggingface_hub import snapshot_download

    prefix = f"{sub}/" if sub else ""
    patterns = [f"{prefix}*.json", f"{prefix}*.safetensors"]
    for local_only in (True, False):
        try:
            return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=local_only)) / sub
        except Exception as exc:
            error = exc
    raise VaeError(f"vae.source: could not fetch {repo!r} from the Hugging Face hub ({type(error).__name__}: "
                   f"{str(error).splitlines()[0][:160]}). Where there is network, run `hf download {repo} --include "
                   f"'{prefix}*' --local-dir DIR`, copy DIR here and set vae.source=DIR") from None


def inspect(cfg: VaeConfig) -> VaeSpec:
    """Read the VAE's config.json: an AutoencoderKL's shape and latent factors, or one message saying what it is."""
    folder = locate(cfg)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise VaeError(f"vae.source: {folder}/config.json is not readable JSON ({exc})") from None
    kind = config.get("_class_name", "")
    if kind != DIFFUSERS_CLASS:
        raise VaeError(f"vae.source: {folder} holds a {kind or 'unknown'!r} model, not a diffusers {DIFFUSERS_CLASS} "
                       f"(SD3's VAE is one: its pipeline's `vae` subfolder)")
    if not any(folder.glob("*.safetensors")):
        raise VaeError(f"vae.source: {folder} has no .safetensors weights (sd3ray never loads pickles); save the VAE "
                       f"with save_pretrained(..., safe_serialization=True)")
    shift = config.get("shift_factor")
    return VaeSpec(cfg.source if not cfg.subfolder else f"{cfg.source}/{cfg.subfolder}", folder,
                   int(config.get("in_channels", 3)), int(config.get("out_channels", 3)),
                   int(config.get("latent_channels", 4)), 2 ** (len(config.get("block_out_channels", [64])) - 1),
                   float(config.get("scaling_factor") or DEFAULT_SCALING), float(shift or 0.0), folder_hash(folder))


def check_shapes(spec: VaeSpec, image_channels: int, image_size: int, model_channels: int, model_size: int,
                 where: str) -> None:
    """Images of `image_channels`×`image_size`² go through this VAE into latents the model must take."""
    if image_channels not in (spec.in_channels, 1):
        raise ConfigError(f"vae.source: the VAE encodes {spec.in_channels}-channel pictures, {where} holds "
                          f"{image_channels}-channel ones; use a VAE made for them")
    if image_size % spec.factor:
        raise ConfigError(f"vae.source: {where} holds {image_size}² images, not a multiple of the VAE's "
                          f"{spec.factor}× downsampling; prepare the set at a multiple of {spec.factor}")
    want = (spec.latent_channels, spec.latent_size(image_size))
    if (model_channels, model_size) != want:
        raise ConfigError(f"model.channels and model.image_size are the latent's in latent space: the VAE turns "
                          f"{image_size}² pictures into {want[0]}×{want[1]}×{want[1]} latents, the config says "
                          f"{model_channels}×{model_size}×{model_size}; set model.channels={want[0]} "
                          f"model.image_size={want[1]}")


class FrozenVae:
    """The VAE's encoder and decoder, loaded once per process on first use; shared by a model and its EMA copy
    (deepcopy returns it). Not an nn.Module: nothing registers it, so nothing trains, syncs or saves it."""

    def __init__(self, cfg: VaeConfig) -> None:
        self.cfg = cfg
        self.spec = inspect(cfg)
        self.model: Any = None

    def __deepcopy__(self, memo: dict) -> FrozenVae:
        return self

    def load(self, device: torch.device) -> Any:
        if self.model is None:
            try:
                from diffusers import AutoencoderKL
                from diffusers.utils import logging as diffusers_logging
            except ImportError:
                raise VaeError("vae.source: latent space loads the VAE through diffusers, which is not installed: "
                               "pip install -e '.[latent]'") from None

            diffusers_logging.set_verbosity_error()
            try:
                model = AutoencoderKL.from_pretrained(self.spec.folder, use_safetensors=True)
            except (OSError, ValueError, RuntimeError) as exc:
                raise VaeError(f"vae.source: {self.spec.source} could not be loaded as an {DIFFUSERS_CLASS} "
                               f"({str(exc).splitlines()[0][:200]})") from None
            self.model = model.eval().requires_grad_(False)
        return self.model.to(device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Pictures (B, C, H, W) in [-1, 1] -> normalised latents (B, c, H/f, W/f) float32. One-channel pictures go
        into a 3-channel VAE as grey RGB."""
        model = self.load(images.device)
        if images.shape[1] == 1 and self.spec.in_channels == 3:
            images = images.expand(-1, 3, -1, -1)
        z = model.encode(images.to(model.dtype)).latent_dist.mode()
        return ((z - self.spec.shift_factor) * self.spec.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Normalised latents (B, c, h, w) -> pictures (B, C, h·f, w·f) in [-1, 1] float32, in batches."""
        model = self.load(latents.device)
        out = []
        for chunk in latents.split(batch_size):
            z = chunk / self.spec.scaling_factor + self.spec.shift_factor
            out.append(model.decode(z.to(model.dtype)).sample.float())
        return torch.cat(out)
