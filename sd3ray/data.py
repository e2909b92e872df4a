"""Data: MNIST import, Parquet shards (pyarrow), the in-memory training set and each step's batch per rank.

On disk an image set is a folder of Parquet shards `{split}-{k:05d}.parquet` with columns
`image` (fixed-size binary, uint8 C×H×W row-major), `label` (int16, −1 when absent) and `caption` (string,
nullable), plus `metadata.json` (channels, image_size, per-split counts and shard names). Any 1- or 3-channel
square set in this layout trains, captioned or labelled.

28×28 MNIST becomes 32×32 by padding 2 background pixels on each side, not by resizing: the digits stay
pixel-exact (no interpolation blur the judge would have to see through) and MNIST's own centring is preserved.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from sd3ray.config import Config
from sd3ray.errors import Sd3rayError
from sd3ray.flow import sample_timesteps
from sd3ray.shared_storage import is_uri
from sd3ray.text import PromptBank, digit_prompts

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLITS = ("train", "test")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> uint8 [0, 255]: images leave the model as uint8 (files, Parquet, samples.npz)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> model space [-1, 1] (float32)."""
    return x.float() / 127.5 - 1.0


class DataError(Sd3rayError):
    """Data is missing or malformed; the message says where files go or how to make them."""


# ------------------------------------------------------------------------------------------------ MNIST IDX


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz) into a uint8 array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic number); re-download MNIST")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {body.size} bytes; re-download MNIST")
    return body.reshape(dims).copy()  # writable, so torch can wrap it without warnings


def _mnist_file(raw_dir: Path, name: str) -> Path | None:
    for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_mnist(root: str | Path, split: str, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """MNIST in torchvision's layout (ROOT/MNIST/raw/*-ubyte) -> images (N, 28, 28) uint8, labels (N,)."""
    raw_dir = Path(root) / "MNIST" / "raw"
    names = MNIST_FILES[split]
    if any(_mnist_file(raw_dir, n) is None for n in names) and download:
        try:
            import torchvision

            torchvision.datasets.MNIST(str(root), train=(split == "train"), download=True)
        except Exception as exc:  # network errors come in many types; the message below is what matters
            raise DataError(f"could not download MNIST to {raw_dir} ({exc}). Put the four *-ubyte files there "
                            f"by hand, or pass --data-root pointing at a folder that has MNIST/raw/") from exc
    paths = [_mnist_file(raw_dir, n) for n in names]
    if any(p is None for p in paths):
        raise DataError(f"MNIST {split} files {names} not found in {raw_dir}. Pass --data-root DIR where "
                        f"DIR/MNIST/raw/ holds them, or run with network access so torchvision downloads them")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DataError(f"MNIST {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) or (N, C, H, W) uint8 -> centred on a zero background of size×size."""
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise DataError(f"images of {h}×{w} do not fit in {size}×{size}; raise model.image_size")
    top, left = (size - h) // 2, (size - w) // 2
    pad = [(0, 0)] * (images.ndim - 2) + [(top, size - h - top), (left, size - w - left)]
    return np.pad(images, pad)


# ------------------------------------------------------------------------------------------------- Parquet


class ShardWriter:
    """Writes one split as Parquet shards, `shard_size` images at a time, so a set larger than memory can be
    written from a stream of chunks; `metadata.json` is updated only by `close()`.

    Shards go to a temporary folder and move in only when the split is complete, so a crash never leaves a split
    that looks whole.
    """

    def __init__(self, out_dir: str | Path, split: str, channels: int, image_size: int, labelled: bool,
                 captioned: bool, shard_size: int = 20000) -> None:
        if channels not in (1, 3):
            raise DataError(f"images must have 1 or 3 channels, got {channels}")
        self.out, self.split, self.shard_size = Path(out_dir), split, shard_size
        self.shape, self.labelled, self.captioned = (channels, image_size, image_size), labelled, captioned
        self.out.mkdir(parents=True, exist_ok=True)
        meta = read_metadata(self.out) if (self.out / "metadata.json").exists() else \
            {"channels": channels, "image_size": image_size, "splits": {}}
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
        c, s, _ = self.shape
        image_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(c * s * s), rows,
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


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def open_folder(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """A folder named by a local path or by a URI pyarrow opens (e.g. `s3://bucket/prefix`, with
    `?endpoint_override=HOST:PORT&scheme=http` for S3-compatible servers): its filesystem and path there."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(str(location))
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError or ValueError by scheme
        raise DataError(f"cannot open {location} ({exc}); use a local folder or a URI such as "
                        f"s3://bucket/prefix with credentials in the environment") from exc
    return fs, path.rstrip("/")


def _is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def read_metadata(parquet_dir: str | Path) -> dict:
    fs, root = open_folder(parquet_dir)
    if not _is_file(fs, f"{root}/metadata.json"):
        raise DataError(f"no Parquet image set at {parquet_dir} (metadata.json missing). Create it with "
                        f"`python jobs/prepare_data.py --data-root DIR --out {parquet_dir}`")
    with fs.open_input_stream(f"{root}/metadata.json") as f:
        return json.loads(f.read())


def upload_image_set(local_dir: Path, location: str) -> None:
    """Copy a prepared image set to `location` (a URI), shards first and metadata.json last, so a reader never
    takes a half-uploaded set for a whole one."""
    fs, root = open_folder(location)
    fs.create_dir(root, recursive=True)
    for path in sorted(local_dir.glob("*.parquet")) + [local_dir / "metadata.json"]:
        with fs.open_output_stream(f"{root}/{path.name}") as out:
            out.write(path.read_bytes())


def image_array(table: pa.Table, channels: int, size: int, where: str) -> np.ndarray:
    """A table's `image` column as (N, C, S, S) uint8 (a copy, so torch can own it)."""
    column = table.column("image").combine_chunks()
    per_image = channels * size * size
    if pa.types.is_fixed_size_binary(column.type):
        raw = np.frombuffer(column.buffers()[1], np.uint8)[column.offset * per_image :][: len(column) * per_image]
    else:  # plain binary written by another tool
        raw = np.frombuffer(b"".join(column.to_pylist()), np.uint8)
    if raw.size != len(table) * per_image:
        raise DataError(f"{where}: image bytes do not match {channels}×{size}×{size} per row")
    return raw.reshape(len(table), channels, size, size).copy()


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
    missing = [name for name in entry["shards"] if not _is_file(fs, f"{root}/{name}")]
    if missing:
        raise DataError(f"{parquet_dir} is incomplete: shards {missing} are missing; re-run jobs/prepare_data.py")
    table = pa.concat_tables(read_shard(fs, root, name, parquet_dir) for name in entry["shards"])
    images = torch.from_numpy(image_array(table, c, s, f"{parquet_dir}/{split}"))
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    captions = table.column("caption").to_pylist() if entry.get("captioned") else None
    return ImageSet(images, labels, captions)


def prepare_mnist(raw_root: str | Path, out_dir: str | Path, image_size: int = 32,
                  download: bool = False) -> str | Path:
    """MNIST IDX -> Parquet (both splits), padded to image_size, in a local folder or at a URI (built locally,
    then uploaded)."""
    if is_uri(out_dir):
        with tempfile.TemporaryDirectory(prefix="sd3ray-prepare-") as tmp:
            upload_image_set(Path(prepare_mnist(raw_root, Path(tmp) / "set", image_size, download)), str(out_dir))
        return out_dir
    for split in SPLITS:
        images, labels = load_mnist(raw_root, split, download)
        write_split(out_dir, split, pad_to(images, image_size)[:, None], labels)
    return Path(out_dir)


def ensure_parquet(parquet_dir: str | Path, raw_root: str | Path, image_size: int, download: bool) -> str | Path:
    """Use the Parquet set if it exists, else build it from MNIST (so the first run needs no extra step); a URI
    gets the set built locally, then uploaded.

    Drivers call this once, before any worker starts (`prepare_dataset`); the training loop only reads
    (`load_splits`), so N workers never race to convert the same files."""
    fs, root = open_folder(parquet_dir)
    if _is_file(fs, f"{root}/metadata.json"):
        return parquet_dir
    if is_uri(parquet_dir):
        return prepare_mnist(raw_root, parquet_dir, image_size, download)
    staging = Path(str(parquet_dir) + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    prepare_mnist(raw_root, staging, image_size, download)
    os.replace(staging, parquet_dir)
    return Path(parquet_dir)


def prepare_dataset(cfg: Config) -> str | Path:
    """The driver's step: make sure `data.parquet_dir` holds the image set, building it on first use from
    `data.source` (MNIST or the synthetic shapes); a `prepared` set must exist already."""
    fs, root = open_folder(cfg.data.parquet_dir)
    if cfg.data.source == "mnist" or _is_file(fs, f"{root}/metadata.json"):
        return ensure_parquet(cfg.data.parquet_dir, cfg.data.raw_root, cfg.model.image_size, cfg.data.download)
    if cfg.data.source == "prepared":
        raise DataError(f"no image set at {cfg.data.parquet_dir}; make it first with jobs/prepare_data.py "
                        f"(--source folder, cifar10 or shapes) --out {cfg.data.parquet_dir}")
    from sd3ray.image_sets import write_coloured_shapes

    if is_uri(cfg.data.parquet_dir):
        return write_coloured_shapes(cfg.data.parquet_dir, SHAPES_FIRST_USE, cfg.model.image_size)
    staging = Path(str(cfg.data.parquet_dir) + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    write_coloured_shapes(staging, SHAPES_FIRST_USE, cfg.model.image_size)
    os.replace(staging, cfg.data.parquet_dir)
    return Path(cfg.data.parquet_dir)


SHAPES_FIRST_USE = 20000  # training images of the synthetic colour set a run builds for itself


def load_splits(cfg: Config) -> tuple[ImageSet, ImageSet]:
    """The loop's step: read the prepared train and test splits into memory."""
    return read_split(cfg.data.parquet_dir, "train"), read_split(cfg.data.parquet_dir, "test")


# ---------------------------------------------------------------------------------------- prompts & batches


def prompt_candidates(images: ImageSet) -> tuple[list[str], torch.Tensor]:
    """The prompt strings and, per image, the indices of the prompts it may be trained with: (N, K) long.

    Labelled digits get every rendering of their label (numeral and word forms); captioned images their caption.
    """
    if images.captions is not None:
        prompts = list(dict.fromkeys(c or "" for c in images.captions))
        lookup = {p: i for i, p in enumerate(prompts)}
        return prompts, torch.tensor([[lookup[c or ""]] for c in images.captions])
    if (images.labels < 0).any() or (images.labels > 9).any():
        raise DataError("images have neither captions nor digit labels 0–9; add a caption column")
    per_label = [digit_prompts(d) for d in range(10)]
    k = len(per_label[0])
    prompts = [p for group in per_label for p in group]
    table = torch.arange(10 * k).view(10, k)
    return prompts, table[images.labels]


class ShardedBatches:
    """Which images each rank trains on at each step, as a pure function of (seed, step).

    Every epoch is a seeded permutation cut into global batches; rank r takes the r-th contiguous slice of the
    global batch. Because nothing depends on history, resume is exact from the step alone, and one worker with
    batch 2b sees exactly the images that two workers with batch b see together.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.global_batch = batch_size * world_size
        if num_items < self.global_batch:
            raise DataError(f"{num_items} images cannot fill a global batch of {self.global_batch} "
                            f"(train.batch_size × workers); lower the batch size")
        self.num_items, self.batch_size, self.rank, self.seed = num_items, batch_size, rank, seed
        self.steps_per_epoch = num_items // self.global_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        """(batch_size,) long indices into the image set for this rank at `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=generator)
        start = within * self.global_batch + self.rank * self.batch_size
        return self._perm[start : start + self.batch_size]


class TrainingBatches:
    """Each step's batch for this rank, gathered on the device from (seed, step) alone: images, prompt tokens
    (one of each image's prompts at random, the empty prompt with probability `prompt_dropout`), t and eps.
    Random draws are made for the global batch and sliced per rank, so the split over workers changes nothing."""

    def __init__(self, images: ImageSet, cfg: Config, rank: int, world_size: int, device: torch.device) -> None:
        prompts, candidates = prompt_candidates(images)
        self.bank = PromptBank.build(prompts, cfg.text.max_length).to(device)
        row_of = {p: i for i, p in enumerate(self.bank.prompts)}
        self.candidates = torch.tensor([row_of[p] for p in prompts])[candidates].to(device)  # (N, K) bank rows
        self.images = images.images.to(device)  # uint8, resident: MNIST is 60 MB
        self.sampler = ShardedBatches(len(images), cfg.train.batch_size, rank, world_size, cfg.train.seed)
        self.global_batch = self.sampler.global_batch
        self.cfg, self.device = cfg, device
        b = cfg.train.batch_size
        self.rank_slice = slice(rank * b, (rank + 1) * b)

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        """x0 (b,C,H,W) in [-1,1], ids and mask (b,L), t (b,), eps (b,C,H,W)."""
        g = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed * 1_000_003 + step)
        n, sl = self.sampler.global_batch, self.rank_slice
        t = sample_timesteps(self.cfg.flow, n, g, self.device)[sl]
        eps = torch.randn((n, *self.images.shape[1:]), generator=g, device=self.device)[sl]
        choice = torch.randint(0, self.candidates.shape[1], (n,), generator=g, device=self.device)[sl]
        dropped = (torch.rand(n, generator=g, device=self.device) < self.cfg.text.prompt_dropout)[sl]
        index = self.sampler.indices(step).to(self.device, non_blocking=True)
        rows = torch.where(dropped, 0, self.candidates[index, choice])  # bank row 0 is the empty prompt
        return from_uint8(self.images[index]), self.bank.ids[rows], self.bank.mask[rows], t, eps
