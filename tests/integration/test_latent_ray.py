"""Latent space end to end on Ray: the latent cache precomputed on Ray Data actors (and resumed after an
interruption), two Ray Train workers training on it, decoded grids in MLflow, and the logged model loading in a fresh
process and returning pictures, or, where its VAE is missing, saying what to fetch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support import MICRO, REPO_ROOT
from tests.vae_models import make_vae, tiny_vae_config

pytest.importorskip("diffusers")

PREDICT = """
import json, sys
import mlflow, numpy as np, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
images = model.predict(pd.DataFrame({"prompt": ["a red circle", "a blue square"]}), params={"seed": 1, "steps": 2})
print(json.dumps({"dtype": str(images.dtype), "shape": list(images.shape), "spread": float(np.std(images))}))
"""


def _prepare(out: Path, vae: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/prepare_data.py", "--existing", "--out", str(out), "--vae", str(vae)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_cached_latent_set_trains_on_two_workers_and_its_model_serves_pictures(ray_head, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from sd3ray.cluster.trainer import build_trainer
    from sd3ray.config import load_config
    from sd3ray.data.image_sets import write_coloured_shapes

    # the shipped latent config's shape: 4 latent channels, 8× smaller per side, 64 px pictures
    vae = make_vae(tmp_path / "vae", tiny_vae_config(block_out_channels=[8, 8, 8, 8], shift_factor=None,
                                                     down_block_types=["DownEncoderBlock2D"] * 4,
                                                     up_block_types=["UpDecoderBlock2D"] * 4))
    data = tmp_path / "shapes"
    write_coloured_shapes(data, 96, 64, num_test=40, shard_size=40)
    env = {**ray_head["env"], "OMP_NUM_THREADS": "1"}
    first = _prepare(data, vae, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "4 shards encoded" in first.stdout  # train 40+40+16, test 40
    (cache,) = (data / "latents").iterdir()
    kept = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.parquet")}
    (cache / "train-00001.parquet").unlink()  # as an interrupted precompute leaves it: a shard and the metadata
    (cache / "metadata.json").unlink()
    again = _prepare(data, vae, env)
    assert again.returncode == 0 and "latents of train-00001.parquet" in again.stdout, again.stderr[-3000:]
    assert "1 shards encoded" in again.stdout  # the finished shards were not redone
    redone = [name for name, t in kept.items() if cache.joinpath(name).stat().st_mtime_ns != t]
    assert redone == ["train-00001.parquet"], redone
    assert json.loads((cache / "metadata.json").read_text())["splits"]["train"]["count"] == 96

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO_ROOT / "configs/shapes_latent.yaml", [
        *MICRO, f"vae.source={vae}", "vae.encode_in_memory_max=0", f"data.parquet_dir={data}",
        f"train.output_dir={tmp_path}",
        "train.steps=4", "train.log_every=2", "train.ckpt_every=4", "train.eval_every=4", "train.batch_size=8",
        f"tracking.uri={uri}", "tracking.experiment=latent", "tracking.log_model=true"])
    result = build_trainer(cfg, "latent", workers=2, storage_path=str(tmp_path / "storage")).fit()
    assert result.metrics["step"] == 4

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("latent").experiment_id])
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "images") if "grid" in a.path]
    assert grids, "no sample grid logged"
    from PIL import Image

    local = client.download_artifacts(run.info.run_id, sorted(grids)[-1], str(tmp_path / "grid"))
    picture = sorted(Path(local).rglob("*.png"))[-1] if Path(local).is_dir() else Path(local)
    assert np.asarray(Image.open(picture).convert("RGB")).shape[0] > 8 * 64  # 8 rows of decoded 64² pictures

    model_uri = run.data.tags["sd3ray.model_uri"]
    fresh = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PREDICT, model_uri], cwd=tmp_path, env=fresh, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dtype"] == "uint8" and out["shape"] == [2, 3, 64, 64] and out["spread"] > 0  # pictures, not latents
    vae.rename(tmp_path / "vae-elsewhere")  # served where its VAE is missing: one message says what to fetch
    missing = subprocess.run([sys.executable, "-c", PREDICT, model_uri], cwd=tmp_path, env=fresh,
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and f"vae.source: {vae} is not a folder on this machine" in missing.stderr
    assert "hf download" in missing.stderr


def test_a_latent_cache_in_object_storage_is_written_and_read_there(ray_head, s3, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out s3://...`: the precompute writes the cache into the bucket beside the set's shards, and a run reads it
    from there, the same latents as encoding the set in memory."""
    import torch

    from sd3ray.config import load_config
    from sd3ray.data.format import upload_image_set
    from sd3ray.data.image_sets import write_coloured_shapes
    from sd3ray.data.latents import load_latent_splits

    for key, value in s3["env"].items():  # this process writes and reads the bucket too
        monkeypatch.setenv(key, value)
    vae = make_vae(tmp_path / "vae")
    local = tmp_path / "shapes"
    write_coloured_shapes(local, 40, 32, num_test=20, shard_size=25)
    uri = s3["uri"]("latent-sets/shapes")
    upload_image_set(local, uri)
    done = _prepare(uri, vae, {**ray_head["env"], "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and "3 shards encoded" in done.stdout, done.stderr[-3000:]
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket="sd3ray", Prefix="latent-sets/shapes/latents/")
            .get("Contents", [])]
    assert sum(k.endswith(".parquet") for k in keys) == 3 and any(k.endswith("/metadata.json") for k in keys)
    sets = [*MICRO, "model.channels=4", "model.image_size=8", "data.source=prepared", f"vae.source={vae}"]
    cached = load_latent_splits(load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [*sets, f"data.parquet_dir={uri}"]))
    fresh = load_latent_splits(load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [*sets, f"data.parquet_dir={local}"]))
    assert "read from the cache" in cached.line and "in memory" in fresh.line
    order = sorted(range(40), key=lambda i: cached.train.captions[i])  # rows come back in any order per shard
    expected = sorted(range(40), key=lambda i: fresh.train.captions[i])
    torch.testing.assert_close(cached.train.images[order].float(), fresh.train.images[expected].float())


def test_a_bucketed_sets_latents_are_cached_bucket_by_bucket(ray_head, tmp_path: Path) -> None:
    """`--vae` on an aspect-ratio bucketed set: each bucket's pictures are encoded at their own shape into the
    bucket's cache, and a run reads every bucket from it."""
    from sd3ray.config import load_config
    from sd3ray.data.bucketed_sets import import_bucketed_folder
    from sd3ray.data.latents import load_model_splits
    from tests.unit.test_buckets import mixed_folder

    vae = make_vae(tmp_path / "vae")
    images, captions = mixed_folder(tmp_path / "images")
    data = tmp_path / "bucketed"
    import_bucketed_folder(images, captions, data, 32, 3, multiple=8, max_aspect=2.0, test_fraction=0.25)
    done = _prepare(data, vae, {**ray_head["env"], "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    cached = sorted(p.parent.parent.parent.name for p in data.glob("*/latents/*/metadata.json"))
    assert cached == ["24x40", "24x48", "32x32", "48x24"]
    cfg = load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [
        *MICRO, "model.channels=4", "model.image_size=8", "model.patch_size=2", "model.pos_embed_max_size=6",
        "data.source=prepared", f"data.parquet_dir={data}", f"vae.source={vae}", "vae.encode_in_memory_max=0"])
    train, test = load_model_splits(cfg, announce=False)
    assert train.buckets == [(6, 10), (6, 12), (8, 8), (12, 6)] and len(train) + len(test) == 48
