"""LoRA fine-tuning of an imported diffusers SD3 transformer on two Ray Train workers, exported back to diffusers as
an adapter and merged: diffusers draws sd3ray's velocities from both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sd3ray.checkpoint import load_checkpoint
from tests.sd3_models import MICRO_SD3, MICRO_SD3_SETS, diffusers_velocity, make_sd3
from tests.support import MICRO, REPO_ROOT

pytest.importorskip("peft")
pytest.importorskip("diffusers")


def _export(checkpoint: Path, out: Path, *flags: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "jobs/export.py"), "--checkpoint", str(checkpoint),
                           "--format", "diffusers", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout


def test_lora_on_two_workers_exports_to_diffusers_with_output_parity(ray_head, mnist_parquet: Path,
                                                                    tmp_path: Path) -> None:
    from diffusers import SD3Transformer2DModel

    from sd3ray.cluster.trainer import build_trainer
    from sd3ray.cluster.worker import DebugHooks
    from sd3ray.config import load_config
    from sd3ray.inference import load_ema_model

    base = make_sd3(tmp_path / "base", MICRO_SD3)
    replicas = tmp_path / "replicas"
    replicas.mkdir()
    cfg = load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [
        *MICRO, *MICRO_SD3_SETS, f"model.init_from={base}", "train.lora.rank=4", "train.lora.alpha=8",
        f"data.parquet_dir={mnist_parquet}", f"train.output_dir={tmp_path}", "train.steps=3", "train.log_every=1",
        "train.ckpt_every=3", "train.eval_every=100", "train.batch_size=8", "train.warmup_steps=0", "train.lr=0.01"])
    trainer = build_trainer(cfg, "lora", workers=2, storage_path=str(tmp_path / "storage"),
                            debug=DebugHooks(save_replica_to=str(replicas)), tracking=False)
    assert trainer.fit().metrics["step"] == 3
    rank0, rank1 = (torch.load(replicas / f"rank{r}.pt") for r in range(2))
    assert rank0.keys() == rank1.keys() and all(".lora_" in k or k.startswith("text_encoder.") for k in rank0)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP kept the adapters identical
    assert any(".lora_B." in k and rank0[k].abs().sum() > 0 for k in rank0)  # and they trained
    checkpoint = tmp_path / "storage/lora/step_00000003"
    _export(checkpoint, tmp_path / "adapter")
    _export(checkpoint, tmp_path / "merged", "--merge")

    ours, _, _ = load_ema_model(str(checkpoint), torch.device("cpu"))  # base + adapter, folded
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 1, 32, 32, generator=g), torch.tensor([0.2, 0.9])
    context, pooled = torch.randn(2, 6, 32, generator=g), torch.randn(2, 32, generator=g)
    with_adapter = SD3Transformer2DModel.from_pretrained(base).eval()
    with_adapter.load_lora_adapter(str(tmp_path / "adapter"), weight_name="pytorch_lora_weights.safetensors")
    merged = SD3Transformer2DModel.from_pretrained(tmp_path / "merged").eval()
    plain = SD3Transformer2DModel.from_pretrained(base).eval()
    with torch.no_grad():
        expected = ours.mmdit(x, t, context, pooled)
        for theirs in (with_adapter, merged):
            torch.testing.assert_close(diffusers_velocity(theirs, x, t, context, pooled), expected,
                                       atol=1e-5, rtol=1e-5)
        assert not torch.allclose(diffusers_velocity(plain, x, t, context, pooled), expected, atol=1e-4)

    # registered after the fact, the model is the adapter (as a training run registers it) and loads base + adapter
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "jobs/register.py"), "--checkpoint", str(checkpoint),
                           "--name", "lora-model", "--tracking-uri", uri], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "registered models:/lora-model/1" in proc.stdout, proc.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts("models:/lora-model/1", dst_path=str(tmp_path / "registered")))
    saved = local / "artifacts" / "checkpoint"
    assert json.loads((saved / "meta.json").read_text())["base_model"]["source"] == str(base)
    assert all(".lora_" in k or k.startswith("text_encoder.") for k in load_checkpoint(saved, merge=False).ema)
    images = mlflow.pyfunc.load_model("models:/lora-model/1").predict(
        pd.DataFrame({"prompt": ["7"]}), params={"seed": 0, "steps": 2})
    assert images.shape == (1, 1, 32, 32) and images.dtype == np.uint8
