"""MNIST as an image set: the IDX files under `--data-root` (downloaded only when asked), padded to 32×32 and written
once as Parquet shards (`sd3ray.data.format`), locally or at a URI.

28×28 MNIST becomes 32×32 by padding 2 background pixels on each side, not by resizing: the digits stay
pixel-exact (no interpolation blur the judge would have to see through) and MNIST's own centring is preserved.
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import numpy as np

from sd3ray.data.format import SPLITS, staged_set, upload_image_set, write_split
from sd3ray.errors import DataError
from sd3ray.storage import is_file, is_uri, location_errors, open_folder

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


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


def prepare_mnist(raw_root: str | Path, out_dir: str | Path, image_size: int = 32,
                  download: bool = False) -> str | Path:
    """MNIST IDX -> Parquet (both splits), padded to image_size, in a local folder or at a URI (built locally,
    then uploaded)."""
    if is_uri(out_dir):
        with tempfile.TemporaryDirectory(prefix="sd3ray-prepare-") as tmp:
            upload_image_set(Path(prepare_mnist(raw_root, Path(tmp) / "set", image_size, download)), str(out_dir))
        return out_dir
    with staged_set(out_dir) as staging:  # an interrupted build never leaves a set that trains
        for split in SPLITS:
            images, labels = load_mnist(raw_root, split, download)
            write_split(staging, split, pad_to(images, image_size)[:, None], labels)
    return Path(out_dir)


def ensure_parquet(parquet_dir: str | Path, raw_root: str | Path, image_size: int, download: bool) -> str | Path:
    """Use the Parquet set if it exists, else build it from MNIST (so the first run needs no extra step); a URI
    gets the set built locally, then uploaded.

    Drivers call this once, before any worker starts (`prepare_dataset`); the training loop only reads
    (`load_splits`), so N workers never race to convert the same files."""
    with location_errors(parquet_dir, "open the image set at"):
        fs, root = open_folder(parquet_dir)
        prepared = is_file(fs, f"{root}/metadata.json")
    if prepared:
        return parquet_dir
    return prepare_mnist(raw_root, parquet_dir, image_size, download)
