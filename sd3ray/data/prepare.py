"""The driver's step before any worker starts: make sure the configured image set exists, building it on first use
(MNIST, or the synthetic colour shapes), so N workers never race to convert the same files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sd3ray.config import Config
from sd3ray.data.mnist import ensure_parquet
from sd3ray.errors import DataError
from sd3ray.model.vae import inspect, uses_vae
from sd3ray.storage import is_file, is_uri, location_errors, open_folder


def prepare_dataset(cfg: Config) -> str | Path:
    """The driver's step: make sure `data.parquet_dir` holds the image set, building it on first use from
    `data.source` (MNIST or the synthetic shapes); a `prepared` set must exist already."""
    where = cfg.data.parquet_dir
    size = picture_size(cfg)
    if not is_uri(where) and Path(where).is_file():
        raise DataError(f"data.parquet_dir (--parquet-dir) {where} is a file; it names the folder of an image set "
                        f"(metadata.json and Parquet shards), made on first use or by jobs/prepare_data.py")
    with location_errors(where, "open the image set at"):
        fs, root = open_folder(where)
        prepared = is_file(fs, f"{root}/metadata.json")
    if cfg.data.source == "mnist" or prepared:
        return ensure_parquet(cfg.data.parquet_dir, cfg.data.raw_root, size, cfg.data.download)
    if cfg.data.source == "prepared":
        raise DataError(f"no image set at {cfg.data.parquet_dir}; make it first with jobs/prepare_data.py "
                        f"(--source folder, cifar10 or shapes) --out {cfg.data.parquet_dir}")
    from sd3ray.data.image_sets import write_coloured_shapes

    if is_uri(cfg.data.parquet_dir):
        return write_coloured_shapes(cfg.data.parquet_dir, SHAPES_FIRST_USE, size)
    staging = Path(str(cfg.data.parquet_dir) + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    write_coloured_shapes(staging, SHAPES_FIRST_USE, size)
    os.replace(staging, cfg.data.parquet_dir)
    return Path(cfg.data.parquet_dir)


def picture_size(cfg: Config) -> int:
    """The side of the pictures a set made on first use holds: the model's, or in latent space the VAE's pictures
    of the model's latents."""
    return cfg.model.image_size * (inspect(cfg.vae).factor if uses_vae(cfg.vae) else 1)


SHAPES_FIRST_USE = 20000  # training images of the synthetic colour set a run builds for itself
