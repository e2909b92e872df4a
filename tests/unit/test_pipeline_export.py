"""A latent-space run on CLIP-L + CLIP-G + T5 exported as an SD3 pipeline folder: diffusers'
`StableDiffusion3Pipeline` loads it and draws a picture; runs with no pipeline form get one message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sd3ray.config import load_config
from sd3ray.data.image_sets import write_coloured_shapes
from sd3ray.inference import load_ema_model
from sd3ray.model.pipeline import PipelineExportError, check_exportable, save_pipeline
from sd3ray.tracking.protocol import NullTracker
from sd3ray.training.context import LocalContext
from sd3ray.training.loop import train
from tests.support import MICRO, REPO_ROOT
from tests.text_encoders import make_clip, make_t5
from tests.vae_models import make_vae

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def test_a_latent_run_on_sd3s_encoders_exports_a_pipeline_diffusers_runs(tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    clip_l, clip_g = make_clip(tmp_path / "clip_l", width=24, projection=20), make_clip(tmp_path / "clip_g", width=16,
                                                                                      projection=12, seed=2)
    t5 = make_t5(tmp_path / "t5", width=48)  # wider than the CLIPs joined (40): SD3's T5 is 4096 to CLIP's 2048
    vae = make_vae(tmp_path / "vae")
    data = tmp_path / "shapes"
    write_coloured_shapes(data, 40, 32, num_test=20, shard_size=40)
    cfg = load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [
        *MICRO, "model.channels=4", "model.image_size=8", "model.patch_size=2", "model.context_dim=48",
        "model.pooled_dim=32", "data.source=prepared", f"data.parquet_dir={data}", f"vae.source={vae}",
        f"text.encoder={clip_l},{clip_g},{t5}", "text.max_length=16", "sample.shift=3.0", "train.steps=2",
        "train.log_every=1", "train.ckpt_every=2", "train.eval_every=100", f"train.output_dir={tmp_path}"])
    result = train(cfg, LocalContext(tmp_path / "run", torch.device("cpu")), NullTracker())
    model, saved, _ = load_ema_model(result.checkpoint, torch.device("cpu"))
    mmdit = {k.removeprefix("mmdit."): v for k, v in model.state_dict().items() if k.startswith("mmdit.")}
    out = save_pipeline(mmdit, saved, tmp_path / "pipeline")
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"] and index["vae"][1] == "AutoencoderKL"
    assert json.loads((out / "scheduler/scheduler_config.json").read_text())["shift"] == 3.0
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]  # safetensors only

    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    image = pipe("a red circle on the left", num_inference_steps=2, height=32, width=32, guidance_scale=2.0,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    # the pipeline's transformer is the run's: the same velocity for the same inputs as sd3ray's MM-DiT
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([0.4])
    context, pooled = torch.randn(1, 5, 48, generator=g), torch.randn(1, 32, generator=g)
    with torch.no_grad():
        theirs = pipe.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=context,
                                  pooled_projections=pooled).sample
        torch.testing.assert_close(theirs, model.mmdit(x, t, context, pooled), atol=1e-5, rtol=1e-5)


def test_runs_without_a_pipeline_form_are_refused_with_one_message(tmp_path: Path) -> None:
    pixel = load_config(REPO_ROOT / "configs/mnist_tiny.yaml", MICRO)
    with pytest.raises(PipelineExportError, match="pixel space.*--format diffusers"):
        check_exportable(pixel)
    vae = make_vae(tmp_path / "vae")
    byte = load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [*MICRO, "model.channels=4", "model.image_size=8",
                                                               f"vae.source={vae}"])
    with pytest.raises(PipelineExportError, match="conditioned on the byte encoder"):
        check_exportable(byte)
