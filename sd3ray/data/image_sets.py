"""Importers: the images users already have, as sd3ray's Parquet image sets (see `sd3ray.data.format`).

- a folder of images with a captions file (CSV `file,caption` or JSON lines `{"file": ..., "caption": ...}`);
- CIFAR-10 as torchvision or the CIFAR site leaves it on disk, captioned with its class names;
- synthetic coloured shapes with free-text captions ("a red circle on the left"): a colour set that needs no
  download, for trying the pipeline and for tests.

Every importer streams: images are decoded and written a chunk at a time (`ShardWriter`), so a set larger than
memory can be converted. Nothing is unpickled except CIFAR's own arrays, through an unpickler that can build nothing
else.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import pickle
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from sd3ray.data.format import ShardWriter, read_metadata, staged_set, upload_image_set
from sd3ray.errors import DataError
from sd3ray.storage import is_uri, read_user_text

CHUNK = 1024  # images decoded per write: bounds memory, not speed


# --------------------------------------------------------------------------------------------- folder + captions


def read_captions(path: Path) -> list[tuple[str, str]]:
    """(image file relative to the folder, caption) pairs from a `.csv` (header `file,caption`) or `.jsonl`."""
    if not path.is_file():
        raise DataError(f"captions file {path} not found")
    pairs: list[tuple[str, str]] = []
    text = read_user_text(path, "captions file")
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((str(row["file"]), str(row["caption"])))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path} line {number} is not a JSON object with \"file\" and \"caption\" "
                                f"({exc})") from exc
    elif path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not {"file", "caption"} <= set(reader.fieldnames or []):
            raise DataError(f"{path} needs a header row with the columns file,caption; has {reader.fieldnames}")
        pairs = [(row["file"], row["caption"]) for row in reader]
    else:
        raise DataError(f"captions file {path} must end in .csv (columns file,caption) or .jsonl")
    if not pairs:
        raise DataError(f"captions file {path} lists no images")
    return pairs


def to_square_array(data: bytes, image_size: int, channels: int, name: str) -> np.ndarray:
    """Encoded image bytes -> (C, S, S) uint8: centre-cropped to a square, resized with antialiasing."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{name} is not an image PIL can read ({exc})") from exc
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((image_size, image_size),
                                                                    Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def is_test(name: str, test_fraction: float) -> bool:
    """A stable split by file name: the same file lands in the same split on every run and machine."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") < test_fraction * 2**32


def import_captioned_folder(images_dir: Path, captions_file: Path, out_dir: str | Path, image_size: int,
                            channels: int, test_fraction: float = 0.05, shard_size: int = 20000) -> str | Path:
    """A folder of images listed in a captions file -> a captioned Parquet image set (train and test splits)."""
    pairs = read_captions(captions_file)
    missing = [name for name, _ in pairs if not (images_dir / name).is_file()]
    if missing:
        raise DataError(f"{len(missing)} images in {captions_file} are not in {images_dir}, e.g. {missing[:3]}")

    def chunks() -> Iterator[tuple[str, np.ndarray, list[str]]]:
        for start in range(0, len(pairs), CHUNK):
            part = pairs[start:start + CHUNK]
            for split in ("train", "test"):
                rows = [(n, c) for n, c in part if is_test(n, test_fraction) == (split == "test")]
                if rows:
                    images = np.stack([to_square_array((images_dir / n).read_bytes(), image_size, channels, n)
                                       for n, _ in rows])
                    yield split, images, [c for _, c in rows]

    return write_image_set(out_dir, chunks, channels, image_size, labelled=False, shard_size=shard_size)


def write_image_set(out_dir: str | Path, chunks: Callable[[], Iterator[tuple[str, np.ndarray, list[str]]]],
                    channels: int, image_size: int, labelled: bool, shard_size: int,
                    labels_of: Callable[[list[str]], np.ndarray] | None = None) -> str | Path:
    """Stream (split, images, captions) chunks into train/test shards; a URI gets the set built locally, then
    uploaded (shards first, metadata last)."""
    if is_uri(out_dir):
        with tempfile.TemporaryDirectory(prefix="sd3ray-import-") as tmp:
            local = write_image_set(Path(tmp) / "set", chunks, channels, image_size, labelled, shard_size, labels_of)
            upload_image_set(Path(local), str(out_dir))
        return out_dir
    with staged_set(out_dir) as staging:  # an interrupted import never leaves a set that trains
        writers = {split: ShardWriter(staging, split, channels, image_size, labelled=labelled, captioned=True,
                                      shard_size=shard_size) for split in ("train", "test")}
        for split, images, captions in chunks():
            writers[split].add(images, labels_of(captions) if labels_of else None, captions)
        empty = [split for split, writer in writers.items() if writer.count + writer._pending_rows == 0]
        if empty:
            raise DataError(f"no images fell in the {empty[0]} split; import more images or change --test-fraction")
        for writer in writers.values():
            writer.close()
    return Path(out_dir)


# ------------------------------------------------------------------------------------------------------ CIFAR-10

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# captions vary in form, as user captions do, so the text encoder learns the class word and not one template
CIFAR_TEMPLATES = ("{}", "a {}", "a photo of a {}")


def cifar_caption(label: int, index: int) -> str:
    name = CIFAR10_CLASSES[label]
    template = CIFAR_TEMPLATES[index % len(CIFAR_TEMPLATES)]
    return template.format(name).replace("a a", "an a")  # "an airplane", "an automobile"


class ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR's python batches (dicts of bytes, lists and numpy arrays) and nothing that can run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name}: a CIFAR batch holds only arrays")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file, binary (`*.bin`) or python (`data_batch_*`) -> (N, 3, 32, 32) uint8, (N,) labels."""
    if path.suffix == ".bin":
        raw = np.frombuffer(path.read_bytes(), np.uint8)
        if raw.size % 3073:
            raise DataError(f"{path} is not a CIFAR-10 binary batch (size {raw.size} is not a multiple of 3073)")
        rows = raw.reshape(-1, 3073)
        return rows[:, 1:].reshape(-1, 3, 32, 32).copy(), rows[:, 0].astype(np.int64)
    with path.open("rb") as f:
        try:
            batch = ArraysOnly(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError) as exc:
            raise DataError(f"{path} is not a CIFAR-10 python batch ({exc})") from exc
    data, labels = batch[b"data"], batch[b"labels"]
    return np.asarray(data, np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, np.int64)


def cifar10_files(root: Path) -> dict[str, list[Path]]:
    """The batch files under ROOT (torchvision's `cifar-10-batches-py`, or the binary `cifar-10-batches-bin`)."""
    for folder, train_names, test_name in (
            ("cifar-10-batches-bin", [f"data_batch_{k}.bin" for k in range(1, 6)], "test_batch.bin"),
            ("cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], "test_batch")):
        base = root / folder
        if base.is_dir():
            files = {"train": [base / n for n in train_names], "test": [base / test_name]}
            missing = [p.name for group in files.values() for p in group if not p.is_file()]
            if missing:
                raise DataError(f"{base} is incomplete: {missing} missing; download CIFAR-10 again")
            return files
    raise DataError(f"no CIFAR-10 under {root} (expected cifar-10-batches-py/ or cifar-10-batches-bin/). Download "
                    f"it with torchvision.datasets.CIFAR10('{root}', download=True)")


def import_cifar10(root: Path, out_dir: str | Path, shard_size: int = 20000) -> str | Path:
    """CIFAR-10 -> a 3×32×32 image set with class-name captions (and the class as label)."""
    files = cifar10_files(root)
    lookup = {cifar_caption(label, k): label for label in range(10) for k in range(len(CIFAR_TEMPLATES))}

    def chunks() -> Iterator[tuple[str, np.ndarray, list[str]]]:
        for split, paths in files.items():
            seen = 0
            for path in paths:
                images, labels = read_cifar_batch(path)
                yield split, images, [cifar_caption(int(y), seen + i) for i, y in enumerate(labels)]
                seen += len(labels)

    return write_image_set(out_dir, chunks, 3, 32, labelled=True, shard_size=shard_size,
                           labels_of=lambda captions: np.array([lookup[c] for c in captions]))


# ---------------------------------------------------------------------------------------------- coloured shapes

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")
PLACES = {"on the left": (0.3, 0.5), "on the right": (0.7, 0.5), "at the top": (0.5, 0.3),
          "at the bottom": (0.5, 0.7)}


def shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    """(size, size) bool: the shape centred at pixel (cx, cy) with the given radius."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    match shape:
        case "circle":
            return (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
        case "square":
            return (np.abs(x - cx) <= radius * 0.85) & (np.abs(y - cy) <= radius * 0.85)
        case "triangle":  # apex up: inside below the two slanted edges and above the base
            return (y <= cy + radius * 0.8) & (np.abs(x - cx) <= (y - (cy - radius)) * 0.6)
    raise ValueError(shape)


def coloured_shapes(num_images: int, image_size: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """(N, 3, S, S) uint8 images of one coloured shape on a dark background, with captions that say its colour,
    shape and place, e.g. "a red circle on the left"."""
    rng = np.random.default_rng(seed)
    images = np.empty((num_images, 3, image_size, image_size), np.uint8)
    captions = []
    colours, places = list(COLOURS), list(PLACES)
    for i in range(num_images):
        colour, shape, place = colours[rng.integers(4)], SHAPES[rng.integers(3)], places[rng.integers(4)]
        fx, fy = PLACES[place]
        jitter = rng.normal(0, 0.03, 2)
        mask = shape_mask(shape, image_size, (fx + jitter[0]) * image_size, (fy + jitter[1]) * image_size,
                          image_size * rng.uniform(0.14, 0.2))
        background = rng.integers(0, 30, 3)
        for ch in range(3):
            images[i, ch] = np.where(mask, COLOURS[colour][ch], background[ch])
        captions.append(f"a {colour} {shape} {place}")
    return images, captions


def write_coloured_shapes(out_dir: str | Path, num_images: int, image_size: int = 32, num_test: int = 500,
                          seed: int = 0, shard_size: int = 20000) -> str | Path:
    """The synthetic colour set as Parquet: `num_images` for training, `num_test` more for the test split."""
    def chunks() -> Iterator[tuple[str, np.ndarray, list[str]]]:
        for split, count, split_seed in (("train", num_images, seed), ("test", num_test, seed + 1)):
            images, captions = coloured_shapes(count, image_size, split_seed)
            yield split, images, captions

    return write_image_set(out_dir, chunks, 3, image_size, labelled=False, shard_size=shard_size)


def describe(out: str | Path) -> str:
    meta = read_metadata(out)
    counts = ", ".join(f"{k}: {v['count']}" for k, v in meta["splits"].items())
    buckets = "; buckets " + ", ".join(f"{name}: {sum(c.values())}" for name, c in meta["buckets"].items()) \
        if "buckets" in meta else ""
    return f"{out} ({meta['channels']}×{meta['image_size']}×{meta['image_size']}; {counts}{buckets})"
