"""Latent space: the frozen VAE against diffusers' own AutoencoderKL and SD3's normalisation formula, the latent cache
and its refusals, and a latent-space run that trains, decodes its pictures, resumes exactly and never touches the
VAE's weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sd3ray.checkpoint import CheckpointError, load_checkpoint
from sd3ray.config import ConfigError, VaeConfig, load_config
from sd3ray.data.format import read_split, write_split
from sd3ray.data.image_sets import write_coloured_shapes
from sd3ray.data.latents import (
    cache_key,
    cache_location,
    encode_set,
    finish,
    load_latent_splits,
    missing_shards,
    read_latent_split,
    write_shard,
)
from sd3ray.errors import DataError
from sd3ray.model.vae import FrozenVae, VaeError, check_shapes, inspect
from sd3ray.tracking.protocol import NullTracker
from sd3ray.training.context import LocalContext
from sd3ray.training.loop import train
from tests.support import MICRO, REPO_ROOT
from tests.vae_models import make_vae, tiny_vae_config

pytest.importorskip("diffusers")

# the micro model on 4×8×8 latents of 32×32 colour pictures (the tiny VAE downsamples 4×)
LATENT = [*MICRO, "model.channels=4", "model.image_size=8", "data.source=prepared", "text.max_length=40"]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vae(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 training and 48 test colour pictures of 32×32, in shards of 50."""
    folder = tmp_path_factory.mktemp("shapes") / "set"
    write_coloured_shapes(folder, 120, 32, shard_size=50, num_test=48)
    return folder


def _config(vae_dir: Path, data: Path, out: Path, *extra: str):
    return load_config(REPO_ROOT / "configs/mnist_tiny.yaml",
                       [*LATENT, f"vae.source={vae_dir}", f"data.parquet_dir={data}", f"train.output_dir={out}",
                        *extra])


def test_latents_are_sd3s_normalisation_of_the_posterior_mode_and_decode_inverts_it(vae_dir: Path) -> None:
    from diffusers import AutoencoderKL

    vae = FrozenVae(VaeConfig(source=str(vae_dir)))
    reference = AutoencoderKL.from_pretrained(vae_dir).eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = vae.encode(x)
    assert latents.shape == (3, 4, 8, 8) and latents.dtype == torch.float32
    with torch.no_grad():
        z = reference.encode(x).latent_dist.mode()
        torch.testing.assert_close(latents, (z - 0.0609) * 1.5305)
        torch.testing.assert_close(vae.decode(latents, batch_size=2), reference.decode(z).sample)
    grey = vae.encode(x[:, :1])  # a one-channel picture goes in as grey RGB
    torch.testing.assert_close(grey, vae.encode(x[:, :1].expand(-1, 3, -1, -1)))


def test_a_vae_without_shift_factor_shifts_by_zero_and_its_depth_sets_the_factor(tmp_path: Path) -> None:
    config = tiny_vae_config(latent_channels=16, block_out_channels=[8, 8, 8, 8], shift_factor=None,
                             down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    folder = make_vae(tmp_path / "sd3-like", config)
    spec = inspect(VaeConfig(source=str(folder)))
    assert (spec.latent_channels, spec.factor, spec.shift_factor, spec.scaling_factor) == (16, 8, 0.0, 1.5305)
    assert spec.latent_size(64) == 8


def test_what_is_not_a_usable_vae_gets_one_message(vae_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(VaeError, match="not a folder on this machine"):
        inspect(VaeConfig(source=str(tmp_path / "nowhere")))
    pipeline = tmp_path / "pipeline"
    shutil.copytree(vae_dir, pipeline / "vae")
    with pytest.raises(VaeError, match="vae.subfolder=vae"):
        inspect(VaeConfig(source=str(pipeline)))
    assert inspect(VaeConfig(source=str(pipeline), subfolder="vae")).sha256 == inspect(VaeConfig(str(vae_dir))).sha256
    other = tmp_path / "transformer"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    with pytest.raises(VaeError, match="not a diffusers AutoencoderKL"):
        inspect(VaeConfig(source=str(other)))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(vae_dir / "config.json", pickled / "config.json")
    with pytest.raises(VaeError, match="no .safetensors"):
        inspect(VaeConfig(source=str(pickled)))
    spec = inspect(VaeConfig(source=str(vae_dir)))
    with pytest.raises(ConfigError, match="model.channels=4 model.image_size=8"):
        check_shapes(spec, 3, 32, 1, 32, "the set")
    with pytest.raises(ConfigError, match="multiple of 4"):
        check_shapes(spec, 3, 30, 4, 7, "the set")


def test_the_cache_holds_what_encoding_in_memory_gives_and_refuses_to_be_reused_wrongly(
        vae_dir: Path, shapes: Path, tmp_path: Path) -> None:
    data = tmp_path / "set"
    shutil.copytree(shapes, data)
    cfg = _config(vae_dir, data, tmp_path)
    vae, spec = FrozenVae(cfg.vae), inspect(cfg.vae)
    small = load_latent_splits(cfg)  # no cache, a small set: encoded in memory, and said so
    assert "encoded once, in memory" in small.line and small.train.images.dtype == torch.float16
    assert small.train.images.shape == (120, 4, 8, 8) and small.train.captions == read_split(data, "train").captions

    location = cache_location(str(data), cache_key(spec, 32, "float16"))
    assert [name for _, name in missing_shards(str(data), location)] == \
        ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet", "test-00000.parquet"]
    for split in ("train", "test"):  # what the Ray Data precompute writes, shard by shard
        meta = json.loads((data / "metadata.json").read_text())
        for name in meta["splits"][split]["shards"]:
            shard = read_split_shard(data, name)
            latents = encode_set(shard, vae, 16, "float16")
            write_shard(location, name, latents.images.numpy(), shard.labels.numpy(), shard.captions)
    finish(location, str(data), spec, 32, "float16")
    cached = load_latent_splits(cfg)
    assert "read from the cache" in cached.line
    assert torch.equal(cached.train.images, small.train.images) and cached.train.captions == small.train.captions
    assert torch.equal(read_latent_split(location, "test").images, small.test.images)

    with pytest.raises(DataError, match="--vae"):  # a large set with no cache for this dtype: refused, never slow
        load_latent_splits(_config(vae_dir, data, tmp_path, "vae.cache_dtype=float32", "vae.encode_in_memory_max=100"))
    rebuilt = read_split(data, "train")  # the train split is rebuilt from other images: the cache is stale
    write_split(data, "train", np.flip(rebuilt.images.numpy(), -1).copy(), captions=rebuilt.captions, shard_size=40)
    with pytest.raises(DataError, match="made from other images"):
        load_latent_splits(cfg)


def read_split_shard(data: Path, name: str):
    """One image shard as an ImageSet (the unit the precompute encodes)."""
    import pyarrow.parquet as pq

    from sd3ray.data.format import ImageSet, image_array

    table = pq.read_table(data / name)
    images = torch.from_numpy(image_array(table, 3, 32, name))
    return ImageSet(images, torch.from_numpy(table.column("label").to_numpy().astype(np.int64)),
                    table.column("caption").to_pylist())


class Pictures(NullTracker):
    """Records the sample grids a run logs."""

    def __init__(self) -> None:
        super().__init__()
        self.grids: list[np.ndarray] = []

    def log_image(self, key, image, step):
        if key == "samples/grid":
            self.grids.append(np.asarray(image))


def test_a_latent_run_decodes_its_grids_resumes_exactly_and_leaves_the_vae_as_it_was(
        vae_dir: Path, shapes: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in vae_dir.iterdir()}
    steps = ["train.log_every=2", "train.ckpt_every=2", "train.eval_every=4", "train.warmup_steps=0"]
    straight = _config(vae_dir, shapes, tmp_path / "a", "train.steps=4", *steps)
    recorder = Pictures()
    result = train(straight, LocalContext(tmp_path / "a" / "run", torch.device("cpu")), recorder)
    # the grid shows pictures: 8×8 tiles of 32×32 decoded colour pictures, not 8×8 latents
    assert recorder.grids and recorder.grids[-1].shape[-1] == 3 and recorder.grids[-1].shape[0] > 8 * 32
    data = load_checkpoint(Path(result.checkpoint))
    assert data.meta["vae"]["sha256"] == inspect(straight.vae).sha256
    assert not any("vae" in key for key in [*data.model, *data.ema])  # never a parameter, never saved

    halves = _config(vae_dir, shapes, tmp_path / "b", "train.steps=2", *steps)
    ctx = LocalContext(tmp_path / "b" / "run", torch.device("cpu"))
    first = train(halves, ctx, NullTracker())
    resumed = LocalContext(tmp_path / "b" / "run", torch.device("cpu"), resume=Path(first.checkpoint))
    second = train(_config(vae_dir, shapes, tmp_path / "b", "train.steps=4", *steps), resumed, NullTracker())
    other = load_checkpoint(Path(second.checkpoint))
    for key, value in data.model.items():
        assert torch.equal(value, other.model[key]), key
    assert {p.name: p.read_bytes() for p in vae_dir.iterdir()} == before  # the frozen VAE's files untouched

    swapped = tmp_path / "swapped"
    make_vae(swapped, seed=1)
    shutil.rmtree(vae_dir.parent / "vae-backup", ignore_errors=True)
    shutil.copytree(vae_dir, vae_dir.parent / "vae-backup")
    try:
        for path in swapped.iterdir():  # another VAE now at the same path
            shutil.copy(path, vae_dir / path.name)
        with pytest.raises(CheckpointError, match="put the VAE it was trained with back"):
            load_checkpoint(Path(result.checkpoint))
    finally:
        for path in (vae_dir.parent / "vae-backup").iterdir():
            shutil.copy(path, vae_dir / path.name)
    pixel = load_config(REPO_ROOT / "configs/mnist_tiny.yaml", MICRO)
    with pytest.raises(CheckpointError, match="latent space"):
        load_checkpoint(Path(result.checkpoint), expected=pixel)


def test_an_sd3_transformer_on_latents_fine_tunes_with_lora_through_its_vae(vae_dir: Path, shapes: Path,
                                                                           tmp_path: Path) -> None:
    """SD3's path in miniature: a diffusers SD3 transformer of 4 latent channels as model.init_from, the VAE that
    makes its latents, a LoRA adapter trained over it; the adapter checkpoint samples decoded pictures."""
    from sd3ray.inference import generate, load_ema_model
    from tests.sd3_models import make_sd3, tiny_sd3_config

    pytest.importorskip("peft")
    base = make_sd3(tmp_path / "sd3", tiny_sd3_config(joint_attention_dim=32, pooled_projection_dim=32))
    cfg = _config(vae_dir, shapes, tmp_path, f"model.init_from={base}", "model.patch_size=2", "model.depth=3",
                  "model.pos_embed_max_size=6", "model.qk_norm=false", "train.lora.rank=4", "train.steps=2",
                  "train.log_every=1", "train.ckpt_every=2", "train.eval_every=100")
    result = train(cfg, LocalContext(tmp_path / "run", torch.device("cpu")), NullTracker())
    data = load_checkpoint(Path(result.checkpoint), merge=False)
    assert data.meta["base_model"]["source"] == str(base) and data.meta["vae"]["source"] == str(vae_dir)
    assert all(".lora_" in key or key.startswith("text_encoder.") for key in data.ema)  # the adapter alone
    model, saved, _ = load_ema_model(result.checkpoint, torch.device("cpu"))  # base + adapter, folded
    pictures = generate(model, ["a red circle"], saved, seed=0, device=torch.device("cpu"), steps=2)
    assert pictures.shape == (1, 3, 32, 32) and pictures.dtype == torch.uint8
