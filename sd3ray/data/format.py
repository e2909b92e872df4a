"""The image-set format: Parquet shards written and read with pyarrow, locally or at a URI, and the in-memory set.

On disk an image set is a folder of Parquet shards `{split}-{k:05d}.parquet` with columns
`image` (fixed-size binary, uint8 C×H×W row-major), `label` (int16, −1 when absent) and `caption` (string,
nullable), plus `metadata.json` (channels, image_size, per-split counts and shard names). Any 1- or 3-channel
square set in this layout trains, captioned or labelled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sd3ray.config import Config
from sd3ray.errors import DataError
from sd3ray.model.vae import check_shapes, inspect, uses_vae
from sd3ray.storage import is_file, location_errors, open_folder

SPLITS = ("train", "test")
FIRST_USE_CHANNELS = {"mnist": 1, "shapes": 3}  # the sets `data.source` builds when none is there


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> uint8 [0, 255]: images leave the model as uint8 (files, Parquet, samples.npz)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> model space [-1, 1] (float32)."""
    return x.float() / 127.5 - 1.0


def to_model_space(x: torch.Tensor) -> torch.Tensor:
    """A set's stored rows -> what the model takes: uint8 pictures to [-1, 1], cached latents (float16/32, already
    normalised, `sd3ray.data.latents`) to float32 as they are."""
    return from_uint8(x) if x.dtype == torch.uint8 else x.float()


# ------------------------------------------------------------------------------------------------- Parquet


class ShardWriter:
    """Writes one split as Parquet shards, `shard_size` images at a time, so a set larger than memory can be
    written from a stream of chunks; `metadata.json` is updated only by `close()`.

    Shards go to a temporary folder and move in only when the split is complete, so a crash never leaves a split
    that looks whole.
    """

    def __init__(self, out_dir: str | Path, split: str, channels: int, image_size: int, labelled: bool,
                 captioned: bool, shard_size: int = 20000, width: int | None = None) -> None:
        if channels not in (1, 3):
            raise DataError(f"images must have 1 or 3 channels, got {channels}")
        self.out, self.split, self.shard_size = Path(out_dir), split, shard_size
        # a bucket of an aspect-ratio bucketed set is H×W (metadata `width`); every other set is square
        width = width or image_size
        self.shape, self.labelled, self.captioned = (channels, image_size, width), labelled, captioned
        self.out.mkdir(parents=True, exist_ok=True)
        meta = read_metadata(self.out) if (self.out / "metadata.json").exists() else \
            {"channels": channels, "image_size": image_size, **({"width": width} if width != image_size else {}),
             "splits": {}}
        if (meta["channels"], meta["image_size"]) != (channels, image_size):
            raise DataError(f"{self.out} holds {meta['channels']}×{meta['image_size']}² images; cannot add "
                            f"{channels}×{image_size}²")
        self.meta, self.count, self.shards = meta, 0, []
        self._tmp = tempfile.TemporaryDirectory(dir=self.out)
        self._pending: list[tuple[np.ndarray, np.ndarray, list[str | None]]] = []
        self._pending_rows = 0

    def add(self, images: np.ndarray, labels: np.ndarray | None = None, captions: list[str] | None = None) -> None:
        """Append (n, C, S, S) uint8 images with their labels and/or captions."""
        if images.dtype != np.uint8 or images.shape[1:] != self.shape:
            raise DataError(f"images must be uint8 (N, {', '.join(map(str, self.shape))}); got {images.dtype} "
                            f"{images.shape}")
        n = images.shape[0]
        label_arr = np.full(n, -1, np.int16) if labels is None else np.asarray(labels).astype(np.int16)
        self._pending.append((np.ascontiguousarray(images).reshape(n, -1), label_arr, list(captions or [None] * n)))
        self._pending_rows += n
        while self._pending_rows >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, rows: int) -> None:
        flat, labels, captions = (np.concatenate([p[0] for p in self._pending]),
                                  np.concatenate([p[1] for p in self._pending]),
                                  [c for p in self._pending for c in p[2]])
        c, s, w = self.shape
        image_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(c * s * w), rows,
                                                         [None, pa.py_buffer(flat[:rows].tobytes())])
        table = pa.table({"image": image_col, "label": pa.array(labels[:rows]),
                          "caption": pa.array(captions[:rows], pa.string())})
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        pq.write_table(table, Path(self._tmp.name) / name)
        self.shards.append(name)
        self.count += rows
        self._pending = [(flat[rows:], labels[rows:], captions[rows:])] if rows < len(flat) else []
        self._pending_rows = len(flat) - rows

    def close(self) -> None:
        """Write the last shard, move the split in (replacing an older one) and record it in metadata.json."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        for old in self.out.glob(f"{self.split}-*.parquet"):
            old.unlink()
        for name in self.shards:
            os.replace(Path(self._tmp.name) / name, self.out / name)
        self._tmp.cleanup()
        # re-read: another writer (the other split) may have recorded its split since this one opened
        meta = read_metadata(self.out) if (self.out / "metadata.json").exists() else self.meta
        meta["splits"][self.split] = {"count": self.count, "shards": self.shards, "labelled": self.labelled,
                                      "captioned": self.captioned}
        _write_json_atomic(self.out / "metadata.json", meta)


def write_split(
    out_dir: str | Path,
    split: str,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    captions: list[str] | None = None,
    shard_size: int = 20000,
) -> None:
    """Write (N, C, H, W) uint8 images (+ labels/captions) in memory as one split (see ShardWriter)."""
    square = images.ndim == 4 and images.shape[2] == images.shape[3]
    if images.dtype != np.uint8 or not square or images.shape[1] not in (1, 3):
        raise DataError(f"images must be uint8 (N, C, S, S) with C in (1, 3); got {images.dtype} {images.shape}")
    writer = ShardWriter(out_dir, split, images.shape[1], images.shape[2], labels is not None, bool(captions),
                         shard_size)
    writer.add(images, labels, captions)
    writer.close()


@contextmanager
def staged_set(out_dir: str | Path) -> Iterator[Path]:
    """Build a whole image set in `OUT.partial`, then put it in place of OUT: a build that is interrupted (Ctrl-C, a
    crash, a full disk) leaves OUT as it was, a complete earlier set or nothing, never some splits of a new set beside
    those of an old one; the next build starts clean. Yields the folder to build in."""
    out = Path(out_dir)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted build left
    yield staging
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def dataset_digest(parquet_dir: str | Path) -> str:
    """A short fingerprint of an image set: its metadata.json and every shard's name and size, which change when
    the set is rebuilt from other images, read without reading the shards themselves (cheap on object storage)."""
    import hashlib

    meta = read_metadata(parquet_dir)
    fs, root = open_folder(parquet_dir)
    names = [name for split in meta["splits"].values() for name in split["shards"]]
    with location_errors(parquet_dir, "read the image set at"):
        sizes = [info.size for info in fs.get_file_info([f"{root}/{name}" for name in names])]
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    digest.update(json.dumps(list(zip(names, sizes))).encode())
    return digest.hexdigest()[:16]


def read_metadata(parquet_dir: str | Path) -> dict:
    with location_errors(parquet_dir, "read the image set at"):
        fs, root = open_folder(parquet_dir)
        if not is_file(fs, f"{root}/metadata.json"):
            raise DataError(f"no Parquet image set at {parquet_dir} (metadata.json missing). Create it with "
                            f"`python jobs/prepare_data.py --data-root DIR --out {parquet_dir}`")
        with fs.open_input_stream(f"{root}/metadata.json") as f:
            raw = f.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{parquet_dir}/metadata.json is damaged ({exc}); rebuild the set: python "
                        f"jobs/prepare_data.py --out {parquet_dir} (with the --source it was made from)") from None


def check_fits_model(channels: int, image_size: int, cfg: Config, parquet_dir: str | Path) -> None:
    """A set of C×S×S images (its metadata.json, or a batch of it) must be what the model takes: otherwise the first
    step fails inside the model, after the data, the model and the tracker were all set up."""
    mc, ms = cfg.model.channels, cfg.model.image_size
    if (channels, image_size) == (mc, ms):
        return
    c, s = channels, image_size
    fix = " ".join(f"--set model.{key}={have}" for key, have, want in (("channels", c, mc), ("image_size", s, ms))
                   if have != want)
    built = " (a folder that holds no set yet is built at that size on first use)" \
        if FIRST_USE_CHANNELS.get(cfg.data.source) == mc else ""
    raise DataError(f"the image set at {parquet_dir} holds {c}×{s}×{s} images but the model takes {mc}×{ms}×{ms} "
                    f"(model.channels={mc}, model.image_size={ms}). Train on this set with {fix} (or a config made "
                    f"for it), or give --parquet-dir a set of {mc}×{ms}×{ms} images{built}")


def check_image_set(cfg: Config) -> None:
    """Before anything is built: a set already at `data.parquet_dir` must fit the model (`check_fits_model`). A
    folder without one passes: the set made there on first use is made to fit, and a missing one is
    `prepare_dataset`'s to explain."""
    where = cfg.data.parquet_dir
    with location_errors(where, "open the image set at"):
        fs, root = open_folder(where)
        prepared = is_file(fs, f"{root}/metadata.json")
    if prepared:
        meta = read_metadata(where)
        if uses_vae(cfg.vae):  # the model takes the VAE's latents of these pictures
            check_shapes(inspect(cfg.vae), meta["channels"], meta["image_size"], cfg.model.channels,
                         cfg.model.image_size, str(where))
        else:
            check_fits_model(meta["channels"], meta["image_size"], cfg, where)


def upload_image_set(local_dir: Path, location: str) -> None:
    """Copy a prepared image set to `location` (a URI), shards first and metadata.json last, so a reader never
    takes a half-uploaded set for a whole one."""
    fs, root = open_folder(location)
    fs.create_dir(root, recursive=True)
    for path in sorted(local_dir.glob("*.parquet")) + [local_dir / "metadata.json"]:
        with fs.open_output_stream(f"{root}/{path.name}") as out:
            out.write(path.read_bytes())


def image_array(table: pa.Table, channels: int, size: int, where: str, width: int | None = None) -> np.ndarray:
    """A table's `image` column as (N, C, S, S) uint8, or (N, C, S, width) (a copy, so torch can own it)."""
    column = table.column("image").combine_chunks()
    width = width or size
    per_image = channels * size * width
    if pa.types.is_fixed_size_binary(column.type):
        raw = np.frombuffer(column.buffers()[1], np.uint8)[column.offset * per_image :][: len(column) * per_image]
    else:  # plain binary written by another tool
        raw = np.frombuffer(b"".join(column.to_pylist()), np.uint8)
    if raw.size != len(table) * per_image:
        raise DataError(f"{where}: image bytes do not match {channels}×{size}×{width} per row")
    return raw.reshape(len(table), channels, size, width).copy()


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) long, −1 when unlabelled
    captions: list[str | None] | None

    def __len__(self) -> int:
        return self.images.shape[0]


def read_shard(fs, root: str, name: str, parquet_dir: str | Path) -> pa.Table:
    """One shard; a truncated or corrupt file is a DataError naming it and the command that rebuilds the set."""
    try:
        return pq.read_table(f"{root}/{name}", filesystem=fs)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise DataError(f"shard {name} of {parquet_dir} cannot be read ({str(exc).splitlines()[0]}): the set is "
                        f"corrupt or was cut short. Rebuild it: python jobs/prepare_data.py --out {parquet_dir} "
                        f"(with the --source and --data-root it was made from)") from None


def read_split(parquet_dir: str | Path, split: str) -> ImageSet:
    """Load a whole split into memory (MNIST is 60 MB: re-reading it every epoch would only cost time)."""
    meta = read_metadata(parquet_dir)
    if split not in meta["splits"]:
        raise DataError(f"{parquet_dir} has no {split!r} split (has {sorted(meta['splits'])})")
    c, s = meta["channels"], meta["image_size"]
    entry = meta["splits"][split]
    fs, root = open_folder(parquet_dir)
    missing = [name for name in entry["shards"] if not is_file(fs, f"{root}/{name}")]
    if missing:
        raise DataError(f"{parquet_dir} is incomplete: shards {missing} are missing; re-run jobs/prepare_data.py")
    table = pa.concat_tables(read_shard(fs, root, name, parquet_dir) for name in entry["shards"])
    images = torch.from_numpy(image_array(table, c, s, f"{parquet_dir}/{split}", meta.get("width")))
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    captions = table.column("caption").to_pylist() if entry.get("captioned") else None
    return ImageSet(images, labels, captions)


def load_splits(cfg: Config) -> tuple[ImageSet, ImageSet]:
    """Read the prepared train and test splits into memory, once they are known to fit the model."""
    check_image_set(cfg)
    return read_split(cfg.data.parquet_dir, "train"), read_split(cfg.data.parquet_dir, "test")
