"""Aspect-ratio bucketed image sets (`jobs/prepare_data.py --source folder --buckets`): every image at the bucket
shape of its own aspect (`sd3ray.data.buckets`), neither cropped nor padded.

On disk, each bucket is an ordinary image set of H×W pictures in its own folder, and the set's metadata.json lists
the buckets and their counts:

    SET/metadata.json        {"channels", "image_size" (the target side), "buckets": {"HxW": {"train": n, "test": m}},
                              "multiple", "max_aspect", "splits": {"train": {"count", "bucketed": true, ...}, ...}}
    SET/HxW/metadata.json    + HxW/{split}-{k:05d}.parquet: the bucket's H×W images (metadata `width`)
"""

from __future__ import annotations

import io
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sd3ray.data.buckets import Bucket, bucket_for, bucket_name
from sd3ray.data.format import SPLITS, ImageSet, ShardWriter, _write_json_atomic, read_metadata, read_split, staged_set
from sd3ray.data.image_sets import CHUNK, is_test, read_captions
from sd3ray.errors import DataError
from sd3ray.storage import is_uri, join, open_folder


def is_bucketed(meta: dict) -> bool:
    return "buckets" in meta


def image_shape(data: bytes, name: str) -> tuple[int, int]:
    """(height, width) of encoded image bytes, read from the header without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{name} is not an image PIL can read ({exc})") from exc
    return height, width


def to_bucket_array(data: bytes, bucket: Bucket, channels: int) -> np.ndarray:
    """Encoded image bytes -> (C, H, W) uint8 at the bucket's shape, resized whole with antialiasing."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("L" if channels == 1 else "RGB").resize((bucket[1], bucket[0]), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def import_bucketed_folder(images_dir: Path, captions_file: Path, out_dir: str | Path, image_size: int,
                           channels: int, multiple: int, max_aspect: float, test_fraction: float = 0.05,
                           shard_size: int = 20000) -> str | Path:
    """A folder of captioned images of any shapes -> a bucketed image set (module docstring)."""
    if image_size % multiple:
        raise DataError(f"--image-size {image_size} is not a multiple of --bucket-multiple {multiple}")
    if max_aspect < 1:
        raise DataError(f"--max-aspect {max_aspect} must be at least 1 (1 = every image square)")
    pairs = read_captions(captions_file)
    missing = [name for name, _ in pairs if not (images_dir / name).is_file()]
    if missing:
        raise DataError(f"{len(missing)} images in {captions_file} are not in {images_dir}, e.g. {missing[:3]}")
    if is_uri(out_dir):  # built locally, then uploaded: shards first, every metadata.json last
        with tempfile.TemporaryDirectory(prefix="sd3ray-import-") as tmp:
            local = import_bucketed_folder(images_dir, captions_file, Path(tmp) / "set", image_size, channels,
                                           multiple, max_aspect, test_fraction, shard_size)
            upload_tree(Path(local), str(out_dir))
        return out_dir
    members: dict[Bucket, list[tuple[str, str]]] = defaultdict(list)
    squeezed = 0
    for name, caption in pairs:
        h, w = image_shape((images_dir / name).read_bytes(), name)
        squeezed += max(h / w, w / h) > max_aspect
        members[bucket_for(h, w, image_size * image_size, multiple, max_aspect)].append((name, caption))
    if squeezed:
        warnings.warn(f"{squeezed} of {len(pairs)} images are more elongated than --max-aspect {max_aspect:g}:1 and "
                      f"were squeezed to it; raise --max-aspect to keep their shapes", stacklevel=2)
    counts: dict[str, dict[str, int]] = {}
    with staged_set(out_dir) as staging:
        for bucket, rows in sorted(members.items()):
            folder = staging / bucket_name(bucket)
            counts[bucket_name(bucket)] = {split: 0 for split in SPLITS}
            for split in SPLITS:
                chosen = [(n, c) for n, c in rows if is_test(n, test_fraction) == (split == "test")]
                if not chosen:
                    continue
                writer = ShardWriter(folder, split, channels, bucket[0], labelled=False, captioned=True,
                                     shard_size=shard_size, width=bucket[1])
                for start in range(0, len(chosen), CHUNK):
                    part = chosen[start : start + CHUNK]
                    writer.add(np.stack([to_bucket_array((images_dir / n).read_bytes(), bucket, channels)
                                         for n, _ in part]), None, [c for _, c in part])
                writer.close()
                counts[bucket_name(bucket)][split] = writer.count
        totals = {split: sum(c[split] for c in counts.values()) for split in SPLITS}
        empty = [split for split, total in totals.items() if total == 0]
        if empty:
            raise DataError(f"no images fell in the {empty[0]} split; import more images or change --test-fraction")
        _write_json_atomic(staging / "metadata.json", {
            "channels": channels, "image_size": image_size, "multiple": multiple, "max_aspect": max_aspect,
            "buckets": counts, "splits": {split: {"count": totals[split], "shards": [], "labelled": False,
                                                  "captioned": True, "bucketed": True} for split in SPLITS}})
    return Path(out_dir)


def upload_tree(local_dir: Path, location: str) -> None:
    """Copy a folder to `location` (a URI): every shard first, then the buckets' metadata.json, the set's last."""
    fs, root = open_folder(location)
    files = sorted(local_dir.rglob("*.parquet")) + sorted(local_dir.glob("*/metadata.json")) + \
        [local_dir / "metadata.json"]
    for path in files:
        relative = path.relative_to(local_dir).as_posix()
        fs.create_dir(f"{root}/{Path(relative).parent.as_posix()}", recursive=True)
        with fs.open_output_stream(f"{root}/{relative}") as out:
            out.write(path.read_bytes())


@dataclass(frozen=True)
class BucketedSet:
    """A split of a bucketed set in memory: one ImageSet per bucket, (H, W) ascending."""

    buckets: list[Bucket]
    parts: list[ImageSet]

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def largest(self) -> ImageSet:
        """The bucket with the most images (the validation loss's and the grid's shape)."""
        return max(self.parts, key=len)


def read_bucketed_split(parquet_dir: str | Path, split: str) -> BucketedSet:
    meta = read_metadata(parquet_dir)
    buckets, parts = [], []
    for name, counts in sorted(meta["buckets"].items()):
        if counts.get(split):
            h, w = (int(v) for v in name.split("x"))
            buckets.append((h, w))
            parts.append(read_split(join(str(parquet_dir), name), split))
    if not parts:
        raise DataError(f"{parquet_dir} has no {split} images in any bucket; rebuild it with more images")
    return BucketedSet(buckets, parts)
