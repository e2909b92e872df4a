"""Aspect-ratio buckets: assignment and its limits, the bucket schedule (a pure function of seed and step), any token
grid cropped from SD3's position table, the resolution-dependent shift against SD3's and Flux's formulas, and a
folder of mixed-shape images that imports, trains, resumes exactly and samples at two shapes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sd3ray.checkpoint import load_checkpoint
from sd3ray.config import load_config
from sd3ray.core.flow import resolve_shift
from sd3ray.data.bucketed_sets import import_bucketed_folder, read_bucketed_split
from sd3ray.data.buckets import BucketSchedule, bucket_for, parse_size
from sd3ray.data.image_sets import describe
from sd3ray.errors import DataError
from sd3ray.inference import drawing_size, generate, load_ema_model
from sd3ray.model.embeddings import sincos_position_embedding
from sd3ray.model.mmdit import MMDiT
from sd3ray.tracking.protocol import NullTracker
from sd3ray.training.context import LocalContext
from sd3ray.training.loop import train
from tests.support import MICRO, REPO_ROOT


def test_an_image_goes_to_the_bucket_of_its_aspect_at_the_target_area() -> None:
    assert bucket_for(300, 300, 32 * 32, 8, 2.0) == (32, 32)
    assert bucket_for(100, 200, 32 * 32, 8, 2.0) == (24, 48)  # 2:1: √(1024/2) = 22.6 -> 24, √(2048) = 45.3 -> 48
    assert bucket_for(500, 100, 32 * 32, 8, 2.0) == (48, 24)  # 5:1 tall, clamped to the 2:1 limit
    assert bucket_for(100, 130, 64 * 64, 16, 4.0) == (64, 80)  # 1.3:1 -> 1.25:1, the nearest in steps of 16
    for h, w in [(37, 91), (640, 480), (1080, 1920)]:
        bh, bw = bucket_for(h, w, 64 * 64, 8, 2.0)
        assert bh % 8 == 0 and bw % 8 == 0 and abs(bh * bw - 64 * 64) / (64 * 64) < 0.25
    with pytest.raises(DataError, match="no area"):
        bucket_for(0, 10, 1024, 8, 2.0)


def test_a_size_is_width_by_height_in_multiples_of_the_patch() -> None:
    assert parse_size("48x32", 8) == (32, 48) and parse_size("32×48", 8) == (48, 32)
    with pytest.raises(DataError, match="width 50 must be positive multiples of 8.*48x32"):
        parse_size("50x32", 8)
    with pytest.raises(DataError, match="WIDTHxHEIGHT"):
        parse_size("48 by 32", 8)


def test_the_bucket_schedule_is_a_pure_function_of_seed_and_step_and_covers_every_bucket() -> None:
    counts, batch = [40, 17, 9, 3], 8  # the last bucket cannot fill a batch: it waits, never drawn short
    schedule = BucketSchedule(counts, batch, seed=3)
    assert schedule.steps_per_epoch == 5 + 2 + 1
    epoch = [schedule.at(step) for step in range(8)]
    assert sorted(b.bucket for b in epoch) == [0, 0, 0, 0, 0, 1, 1, 2]
    for bucket, n in enumerate(counts[:3]):
        drawn = torch.cat([b.indices for b in epoch if b.bucket == bucket])
        assert len(set(drawn.tolist())) == len(drawn) and int(drawn.max()) < n  # no image twice in an epoch
    fresh = BucketSchedule(counts, batch, seed=3)  # another rank, or a resumed run, asked out of order
    for step in (13, 2, 7, 30, 0):
        assert fresh.at(step).bucket == schedule.at(step).bucket
        assert torch.equal(fresh.at(step).indices, schedule.at(step).indices)
    assert [BucketSchedule(counts, batch, seed=4).at(s).bucket for s in range(8)] != [b.bucket for b in epoch]
    with pytest.raises(DataError, match="no bucket holds a global batch of 16"):
        BucketSchedule([9, 15], 16, seed=0)


def test_a_non_square_grid_takes_the_centre_crop_of_sd3s_position_table() -> None:
    cfg = load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [*MICRO, "model.pos_embed_max_size=12"]).model
    mmdit = MMDiT(cfg)
    table = sincos_position_embedding(cfg.width, 12).view(12, 12, -1)
    rows, cols = 24 // cfg.patch_size, 48 // cfg.patch_size  # 6 × 12 patches
    top, left = (12 - rows) // 2, (12 - cols) // 2
    crop = table[top : top + rows, left : left + cols].reshape(-1, cfg.width)
    torch.testing.assert_close(mmdit.positions(24, 48), crop)
    out = mmdit(torch.randn(2, 1, 24, 48), torch.rand(2), torch.randn(2, 3, 32), torch.randn(2, 32))
    assert out.shape == (2, 1, 24, 48)
    with pytest.raises(ValueError, match="at most 48"):
        mmdit(torch.randn(1, 1, 24, 52), torch.rand(1), torch.randn(1, 3, 32), torch.randn(1, 32))


def test_the_resolution_shift_follows_sd3s_and_fluxs_formulas() -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    # SD3 §5.3.2: α = √(m/n); from its 256² reference (256 latent tokens) to 1024² (4,096 tokens) α = 4. SD3's
    # released inference configs use 3.0 there, a value its authors picked by human preference, not the formula
    assert resolve_shift("auto", "sqrt", 256, 4096) == pytest.approx(4.0)
    assert resolve_shift("auto", "sqrt", 256, 256) == pytest.approx(1.0)
    assert resolve_shift(3.0, "sqrt", 256, 4096) == 3.0  # a number is kept as it is
    for tokens in (256, 1024, 2304, 4096):  # Flux: exp(μ), μ from diffusers' own calculate_shift
        assert resolve_shift("auto", "flux", 256, tokens) == pytest.approx(math.exp(calculate_shift(tokens)))
    assert resolve_shift("auto", "flux", 256, 4096) == pytest.approx(3.158, abs=1e-3)  # ≈ SD3's 3.0 at 1024²
    with pytest.raises(ValueError, match="token count"):
        resolve_shift("auto", "sqrt", 256, None)


def mixed_folder(root: Path) -> tuple[Path, Path]:
    """48 captioned colour images of four shapes (square, 2:1 wide, 1:2 tall, 3:2 wide): a bar across the
    picture's long side, coloured as its caption says."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    lines = ["file,caption"]
    rng = np.random.default_rng(0)
    for i in range(48):
        w, h = [(60, 60), (120, 60), (50, 100), (90, 60)][i % 4]
        colour = ["red", "green", "blue"][i % 3]
        pixels = np.full((h, w, 3), 255, np.uint8)
        rgb = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}[colour]
        band = slice(h // 3, 2 * h // 3) if w >= h else slice(w // 3, 2 * w // 3)
        if w >= h:
            pixels[band, :] = rgb
        else:
            pixels[:, band] = rgb
        pixels = np.clip(pixels.astype(int) + rng.integers(-10, 10, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:02d}.png")
        lines.append(f"img{i:02d}.png,a {colour} bar")
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root, root / "captions.csv"


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, captions = mixed_folder(tmp_path_factory.mktemp("mixed") / "images")
    out = tmp_path_factory.mktemp("bucketed") / "set"
    import_bucketed_folder(images, captions, out, 32, 3, multiple=8, max_aspect=2.0, test_fraction=0.25)
    with pytest.warns(UserWarning, match="36 of 48 images are more elongated than --max-aspect 1.2:1"):
        import_bucketed_folder(images, captions, out.with_name("narrow"), 32, 3, multiple=8, max_aspect=1.2)
    return out


def test_a_folder_of_mixed_shapes_imports_into_buckets_without_crops(bucketed: Path) -> None:
    train = read_bucketed_split(bucketed, "train")
    assert train.buckets == [(24, 40), (24, 48), (32, 32), (48, 24)]  # 3:2 (as 5:3), 2:1, 1:1, 1:2
    assert len(train) + len(read_bucketed_split(bucketed, "test")) == 48
    for (h, w), part in zip(train.buckets, train.parts):
        assert part.images.shape[1:] == (3, h, w)
    wide = train.parts[1].images[0].float()  # a wide picture's bar spans its whole width: resized whole, not cropped
    assert (wide[:, 12, :] < 250).any(0).all()
    assert "buckets 24x40: 12, 24x48: 12, 32x32: 12, 48x24: 12" in describe(bucketed)


def _bucket_config(data: Path, out: Path, *extra: str):
    return load_config(REPO_ROOT / "configs/mnist_tiny.yaml", [
        *MICRO, "model.channels=3", "model.patch_size=8", "model.pos_embed_max_size=6", "data.source=prepared",
        f"data.parquet_dir={data}", f"train.output_dir={out}", "train.batch_size=4", "train.log_every=2",
        "train.ckpt_every=2", "train.eval_every=100", "train.warmup_steps=0", "flow.shift=auto",
        "flow.shift_reference_tokens=16", "text.max_length=16", *extra])


class GridKeys(NullTracker):
    """The shape of each sample grid a run logs, by key."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: dict[str, tuple[int, ...]] = {}

    def log_image(self, key, image, step):
        self.shapes[key] = np.asarray(image).shape


def test_a_bucketed_run_resumes_exactly_and_samples_at_two_shapes(bucketed: Path, tmp_path: Path) -> None:
    grids = GridKeys()
    straight = train(_bucket_config(bucketed, tmp_path / "a", "train.steps=6"),
                     LocalContext(tmp_path / "a" / "run", torch.device("cpu")), grids)
    # the square grid, and one per bucket shape beside it (the three largest buckets other than the square)
    assert {"samples/grid", "samples/grid_24x40", "samples/grid_24x48", "samples/grid_48x24"} <= set(grids.shapes)
    assert grids.shapes["samples/grid_24x48"][1] > grids.shapes["samples/grid_24x48"][0]  # wider than tall
    first = train(_bucket_config(bucketed, tmp_path / "b", "train.steps=4"),
                  LocalContext(tmp_path / "b" / "run", torch.device("cpu")), NullTracker())
    resumed = train(_bucket_config(bucketed, tmp_path / "b", "train.steps=6"),
                    LocalContext(tmp_path / "b" / "run", torch.device("cpu"), resume=Path(first.checkpoint)),
                    NullTracker())
    a, b = (load_checkpoint(Path(r.checkpoint)).model for r in (straight, resumed))
    for key, value in a.items():
        assert torch.equal(value, b[key]), key

    model, cfg, _ = load_ema_model(straight.checkpoint, torch.device("cpu"))
    for text, shape in (("48x24", (3, 24, 48)), ("24x48", (3, 48, 24))):
        pictures = generate(model, ["a red bar"], cfg, 0, torch.device("cpu"), steps=2, size=drawing_size(cfg, text))
        assert pictures.shape == (1, *shape)
    with pytest.raises(DataError, match="multiples of 8"):
        drawing_size(cfg, "44x24")


def test_a_bucketed_set_needs_a_position_table_that_covers_its_largest_bucket(bucketed: Path, tmp_path: Path) -> None:
    cfg = _bucket_config(bucketed, tmp_path, "model.patch_size=4", "model.pos_embed_max_size=8", "train.steps=2")
    with pytest.raises(DataError, match="model.pos_embed_max_size=12"):
        train(cfg, LocalContext(tmp_path / "run", torch.device("cpu")), NullTracker())


def test_buckets_train_in_latent_space_and_decode_at_each_shape(bucketed: Path, tmp_path: Path) -> None:
    """The bucketed set through a tiny VAE (4× smaller per side): each bucket's latents at its own shape, a grid
    per shape decoded to pictures, samples at two aspects decoded to their picture sizes."""
    pytest.importorskip("diffusers")
    from sd3ray.data.latents import load_model_splits
    from tests.vae_models import make_vae

    vae = make_vae(tmp_path / "vae")
    cfg = _bucket_config(bucketed, tmp_path, "model.channels=4", "model.image_size=8", "model.patch_size=2",
                         "model.pos_embed_max_size=6", f"vae.source={vae}", "train.steps=2", "train.eval_every=2")
    train_set, _ = load_model_splits(cfg, announce=False)
    assert train_set.buckets == [(6, 10), (6, 12), (8, 8), (12, 6)]  # 24x40, 24x48, 32x32, 48x24 pictures / 4
    assert all(part.images.shape[1:] == (4, *bucket) for bucket, part in zip(train_set.buckets, train_set.parts))
    grids = GridKeys()
    result = train(cfg, LocalContext(tmp_path / "run", torch.device("cpu")), grids)
    assert grids.shapes["samples/grid_6x12"][1] > 8 * 48  # 8 decoded 24×48 pictures a row, not 6×12 latents
    model, saved, _ = load_ema_model(result.checkpoint, torch.device("cpu"))
    wide = drawing_size(saved, "48x24")
    assert wide == (6, 12)  # the latent's shape
    pictures = generate(model, ["a blue bar"], saved, 0, torch.device("cpu"), steps=2, size=wide)
    assert pictures.shape == (1, 3, 24, 48)
    with pytest.raises(DataError, match="multiples of 8"):  # the patch (2) times the VAE's factor (4)
        drawing_size(saved, "44x24")
