"""A trained latent-space run as the folder diffusers' `StableDiffusion3Pipeline.from_pretrained` loads: the exported
transformer, the run's frozen VAE and CLIP/T5 encoders copied beside it with their tokenizers, the flow-matching
scheduler at the run's sampling shift, and `model_index.json` naming them all. Safetensors only, as everything
sd3ray writes.

SD3's pipeline joins two CLIP encoders (CLIP-L, CLIP-G) and, optionally, one T5, in that order; a run conditioned
otherwise (the byte encoder, or another mix) has no pipeline form, and neither has a pixel-space run (the pipeline
always decodes through its VAE). One difference remains by design: sd3ray masks padding tokens out of joint
attention, the pipeline attends to them, so its images differ from `jobs/sample.py`'s for the same seed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from sd3ray.config import Config
from sd3ray.core.flow import resolve_shift
from sd3ray.errors import Sd3rayError
from sd3ray.model import interop
from sd3ray.model.pretrained_text import inspect as inspect_encoder
from sd3ray.model.pretrained_text import is_pretrained
from sd3ray.model.vae import inspect as inspect_vae
from sd3ray.model.vae import uses_vae

PIPELINE_CLASS = "StableDiffusion3Pipeline"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
ENCODER_CLASSES = {"clip": "CLIPTextModelWithProjection", "t5": "T5EncoderModel"}


class PipelineExportError(Sd3rayError):
    """The run cannot be written as an SD3 pipeline (pixel space, or encoders SD3's pipeline does not join)."""


def check_exportable(cfg: Config) -> list[Any]:
    """The run's encoder specs, in the pipeline's order, or one message saying why it has no pipeline form."""
    if not uses_vae(cfg.vae):
        raise PipelineExportError("--format pipeline: the run trained in pixel space, and SD3's pipeline always "
                                  "decodes through a VAE; export the transformer with --format diffusers")
    specs = [inspect_encoder(source) for source in cfg.text.encoder] if is_pretrained(cfg.text) else []
    kinds = [spec.kind for spec in specs]
    if kinds not in (["clip", "clip"], ["clip", "clip", "t5"]):
        have = "the byte encoder" if not specs else " + ".join(kinds)
        raise PipelineExportError(f"--format pipeline: SD3's pipeline joins CLIP-L, CLIP-G and optionally T5 (in "
                                  f"that order); this run was conditioned on {have}. Export the transformer with "
                                  f"--format diffusers")
    return specs


def tokenizer_class(folder: Path) -> str:
    """The tokenizer class its folder names (tokenizer_config.json), else transformers' AutoTokenizer."""
    config = folder / "tokenizer_config.json"
    if config.is_file():
        name = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
        if name:
            return str(name)
    return "AutoTokenizer"


def copy_model_files(source: Path, destination: Path) -> None:
    """A model folder's configs, tokenizer files and safetensors (never pickles)."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix in (".json", ".safetensors", ".txt", ".model"):
            shutil.copy2(path, destination / path.name)


def sampling_shift(cfg: Config) -> float:
    """The run's sampling shift at its own size (the scheduler's fixed `shift`)."""
    tokens = (cfg.model.image_size // cfg.model.patch_size) ** 2
    return resolve_shift(cfg.sample.shift, cfg.flow.shift_rule, cfg.flow.shift_reference_tokens, tokens)


def save_pipeline(mmdit: dict[str, torch.Tensor], cfg: Config, out: Path) -> Path:
    """Write the SD3 pipeline folder at `out` from the MM-DiT's state (merged: a pipeline has no adapters)."""
    import diffusers

    specs = check_exportable(cfg)
    out.mkdir(parents=True, exist_ok=True)
    interop.save_diffusers(mmdit, cfg.model, out / "transformer")
    copy_model_files(inspect_vae(cfg.vae).folder, out / "vae")
    index: dict[str, Any] = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
                             "scheduler": ["diffusers", SCHEDULER_CLASS], "vae": ["diffusers", "AutoencoderKL"],
                             "transformer": ["diffusers", interop.DIFFUSERS_CLASS]}
    for slot, suffix in enumerate(("", "_2", "_3")):
        spec = specs[slot] if slot < len(specs) else None
        if spec is None:  # no T5: the pipeline encodes zeros in its place, as SD3 allows
            index[f"text_encoder{suffix}"] = index[f"tokenizer{suffix}"] = [None, None]
            continue
        copy_model_files(spec.folder, out / f"text_encoder{suffix}")
        copy_model_files(spec.folder, out / f"tokenizer{suffix}")
        index[f"text_encoder{suffix}"] = ["transformers", ENCODER_CLASSES[spec.kind]]
        index[f"tokenizer{suffix}"] = ["transformers", tokenizer_class(spec.folder)]
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": SCHEDULER_CLASS, "_diffusers_version": diffusers.__version__, "num_train_timesteps": 1000,
         "shift": sampling_shift(cfg)}, indent=2))
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
