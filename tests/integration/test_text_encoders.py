"""Frozen pretrained text encoders end to end on the shared Ray head: prompts encoded once by Ray Data actors into
the set's table, two Ray Train workers training on it, and the logged MLflow model sampling through the encoders."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from sd3ray.config import load_config
from sd3ray.data.image_sets import write_coloured_shapes
from sd3ray.data.text_embeddings import data_prompts, read_table
from sd3ray.model.pretrained_text import folder_hash
from tests.support import MICRO, REPO_ROOT
from tests.text_encoders import make_encoders


def test_ray_data_precomputes_prompts_then_two_workers_train_and_the_logged_model_samples(
        ray_head, tmp_path: Path) -> None:
    import mlflow
    import pandas as pd

    from sd3ray.cluster.ray_data import precompute_text_embeddings
    from sd3ray.cluster.trainer import build_trainer

    encoders = make_encoders(tmp_path / "encoders")
    hashes = [folder_hash(folder) for folder in encoders]
    shapes = Path(write_coloured_shapes(tmp_path / "shapes", 256, image_size=16, num_test=64))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO_ROOT / "configs/shapes_tiny.yaml", [
        *MICRO, "model.image_size=16", "model.patch_size=4", "text.max_length=12",
        f"text.encoder={','.join(map(str, encoders))}", "model.context_dim=40", "model.pooled_dim=32",
        f"data.parquet_dir={shapes}", "data.loading=memory", f"train.output_dir={tmp_path}", f"tracking.uri={uri}",
        "tracking.experiment=text-encoders", "train.steps=4", "train.ckpt_every=4", "train.eval_every=4"])

    path, count = precompute_text_embeddings(str(shapes), cfg.text, actors=1)
    info, prompts, context, _, mask = read_table(shapes)
    assert prompts == data_prompts(shapes) and count == len(prompts) and prompts[0] == ""
    assert context.shape == (count, 24, 40) and [e["sha256"] for e in info["encoders"]] == hashes

    result = build_trainer(cfg, "pretrained-text", workers=2, storage_path=str(tmp_path / "storage")).fit()
    assert result.error is None and result.metrics["step"] == 4
    assert [folder_hash(folder) for folder in encoders] == hashes  # the frozen weights were not touched

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("text-encoders").experiment_id])
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "config"))).read_text()
    assert yaml.safe_load(config)["text"]["encoder"] == list(map(str, encoders))
    (logged,) = client.search_logged_models([run.info.experiment_id])
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(logged.model_uri)
    images = model.predict(pd.DataFrame({"prompt": ["a red circle", "a blue square on the left"]}),
                           params={"steps": 2})
    assert images.shape == (2, 3, 16, 16) and images.dtype == "uint8"
    requirements = Path(mlflow.artifacts.download_artifacts(f"{logged.artifact_location}/requirements.txt",
                                                            dst_path=str(tmp_path / "req"))).read_text()
    assert "transformers" in requirements
    assert torch.from_numpy(images).float().std() > 0
