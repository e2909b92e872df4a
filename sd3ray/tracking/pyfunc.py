"""A trained model as an MLflow pyfunc model: loadable with `mlflow.pyfunc.load_model`, registrable, servable.

The contract: `predict(df, params)` takes a DataFrame with a `prompt` column (strings) and the optional params
`seed`, `guidance`, `guidance_low`, `guidance_high`, `steps`, `sampler` (defaults: the run's sample settings) and
returns a uint8 array of shape (N, C, H, W), one image per prompt, the same as `samples.npz`'s `images`; the same
seed gives the same images.

The model's artifacts hold a weights-only checkpoint with the EMA weights alone (what sampling uses), and its code
is sd3ray itself (`code_paths`), so a fresh process with torch installed loads it without sd3ray installed. The
model is logged as code (`pyfunc_entry.py`), not as a pickle: loading it runs sd3ray's code and unpickles nothing.
A LoRA run's model holds its adapter alone (MBs) and the base model's source and hash: loading it reads the base
from `model.init_from` (which must hold those very weights) and folds the adapter in (`sd3ray.checkpoint`).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from sd3ray.checkpoint import CheckpointData, write_checkpoint
from sd3ray.config import Config
from sd3ray.model.vae import picture_shape, uses_vae

ENTRY_FILE = Path(__file__).resolve().with_name("pyfunc_entry.py")
CHECKPOINT_ARTIFACT = "checkpoint"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # sd3ray/, shipped whole as the model's code
# what serving in a fresh environment installs (`mlflow models serve` without --env-manager local)
REQUIREMENTS = ["torch", "numpy", "pyyaml", "pyarrow", "einops", "pillow", "pandas"]


class Sd3rayModel(mlflow.pyfunc.PythonModel):
    """The EMA Denoiser behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        import torch

        from sd3ray.inference import load_ema_model

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.cfg, self.step = load_ema_model(context.artifacts[CHECKPOINT_ARTIFACT], self.device)

    # a DataFrame hint is one MLflow infers no schema from (`signature()` states it) and that stops its warning
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        from sd3ray.inference import drawing_size, generate, with_guidance

        params = params or {}
        prompts = [str(prompt) for prompt in model_input["prompt"]]
        sample = self.cfg.sample
        interval = [float(params.get(f"guidance_{edge}", value)) for edge, value in
                    zip(("low", "high"), sample.guidance_interval)]
        cfg = with_guidance(self.cfg, interval)
        size = str(params.get("size", "") or "")  # "WxH" pictures; "" = the model's square
        images = generate(self.model, prompts, cfg, int(params.get("seed", 0)), self.device,
                          float(params.get("guidance", sample.guidance)), int(params.get("steps", sample.steps)),
                          str(params.get("sampler", sample.sampler)), size=drawing_size(cfg, size) if size else None)
        return images.numpy()


def requirements(cfg: Config) -> list[str]:
    """What serving installs: frozen pretrained text encoders load through transformers (their weights are not in
    the model: its checkpoint names their folders and content hashes, and loading says what to fetch); a LoRA
    model's base is read from its safetensors (a hub id's through huggingface_hub)."""
    pretrained = tuple(cfg.text.encoder) != ("byte",)
    extra = ["transformers", "tokenizers", "safetensors"] if pretrained else []
    if cfg.train.lora.rank:
        extra += [name for name in ("safetensors", "huggingface_hub") if name not in extra]
    if uses_vae(cfg.vae):  # the VAE decodes the latents it draws; like the encoders, it is named, not bundled
        extra += [name for name in ("diffusers", "safetensors", "huggingface_hub") if name not in extra]
    return REQUIREMENTS + extra


def signature(cfg: Config):
    """Input: a `prompt` string column; output: uint8 (N, C, H, W); params with the run's sample settings."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    s = cfg.sample
    channels, side = picture_shape(cfg.model, cfg.vae)  # pictures, decoded by the VAE in latent space
    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, channels, *((-1, -1) if cfg.model.pos_embed_max_size
                                                                          else (side, side))))]),
        params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("guidance", "double", float(s.guidance)),
                            ParamSpec("steps", "long", int(s.steps)), ParamSpec("sampler", "string", s.sampler),
                            # guidance acts for t in [guidance_low, guidance_high] only (t = 1 is noise)
                            ParamSpec("guidance_low", "double", float(s.guidance_interval[0])),
                            ParamSpec("guidance_high", "double", float(s.guidance_interval[1])),
                            # "WxH" pictures (a model with SD3's position table draws any bucket); "" = its square
                            ParamSpec("size", "string", "")]))


def model_name(run_name: str) -> str:
    """The logged model's name, after its run: MLflow's model list then tells one run's model from another's.
    MLflow refuses / : . % and quotes in it."""
    return "sd3ray-" + (re.sub(r"[/:.%\"'\s]+", "_", run_name).strip("_") or "model")


def log_pyfunc_model(tracking_uri: str, run_id: str, cfg: Config, step: int, ema: dict, registered_model: str = ""):
    """Log the EMA weights of run `run_id` as its pyfunc model (registered as `registered_model` when given).
    Returns MLflow's ModelInfo (`model_uri`, `registered_model_version`)."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(tracking_uri)
    run_name = mlflow.MlflowClient().get_run(run_id).info.run_name or ""
    with tempfile.TemporaryDirectory(prefix="sd3ray-model-") as tmp:
        checkpoint = write_checkpoint(Path(tmp) / CHECKPOINT_ARTIFACT, CheckpointData(step, cfg, {}, ema),
                                      weights_only=True)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=model_name(run_name), python_model=str(ENTRY_FILE),
                artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
                code_paths=[str(PACKAGE_DIR)], signature=signature(cfg), pip_requirements=requirements(cfg),
                input_example=pd.DataFrame({"prompt": ["7", "seven"]}), step=step,
                registered_model_name=registered_model or None)
        clean_mlmodel(info.model_id, Path(tmp))
    return info


def clean_mlmodel(model_id: str, scratch: Path) -> None:
    """Rewrite the logged MLmodel without the paths of the machine that logged it: MLflow records where the
    models-from-code file and the checkpoint were copied from (a checkout, a temporary folder), and reads neither
    back: it loads the copies inside the model, the code file by its base name (`_load_context_model_and_signature`)
    and the artifacts by their relative `path`. What a user reads then names nothing that is gone."""
    import mlflow
    import yaml

    client = mlflow.MlflowClient()
    location = client.get_logged_model(model_id).artifact_location.rstrip("/")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/MLmodel",
                                                     dst_path=str(scratch / "mlmodel")))
    spec = yaml.safe_load(local.read_text())
    flavor = spec.get("flavors", {}).get("python_function", {})
    if "model_code_path" in flavor:
        flavor["model_code_path"] = Path(flavor["model_code_path"]).name
    for artifact in flavor.get("artifacts", {}).values():
        artifact.pop("uri", None)
    local.write_text(yaml.safe_dump(spec, sort_keys=False))
    client.log_model_artifact(model_id, str(local))
