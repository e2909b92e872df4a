"""The latent cache: an image set's pictures encoded once by a frozen VAE, so training reads latents and loads no VAE.

A cache lives beside the image shards, one folder per key, written by `jobs/prepare_data.py --vae` (on Ray Data,
`sd3ray.cluster.ray_data.precompute_latents`):

    {set}/latents/{vae sha256}-{image size}px-{dtype}/metadata.json       written last: the cache is whole
    {set}/latents/{key}/{split}-{k:05d}.parquet                           one per image shard, the same name

Rows hold `latent` (fixed-size binary: C×h×w values of the key's dtype, normalised as SD3 does, see
`sd3ray.model.vae`), `label` and `caption`, so a latent shard trains without its image shard. The metadata records
the VAE's fingerprint and the image set's digest: a cache made from other images (the set was rebuilt) is stale and
refused, never reused silently. A shard is written aside and moved into place whole, so an interrupted precompute
resumes with the shards it has not finished.

A run whose set has no cache for its VAE encodes the set once, in memory, when the set is small
(`vae.encode_in_memory_max`), and is refused otherwise; the console says which path it took and why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sd3ray.config import Config
from sd3ray.data.bucketed_sets import BucketedSet, is_bucketed, read_bucketed_split
from sd3ray.data.format import (
    SPLITS,
    ImageSet,
    check_image_set,
    dataset_digest,
    from_uint8,
    load_splits,
    read_metadata,
    read_shard,
    read_split,
)
from sd3ray.errors import DataError
from sd3ray.model.vae import FrozenVae, VaeSpec, check_shapes, inspect, uses_vae
from sd3ray.storage import is_file, join, open_folder

CACHE_FOLDER = "latents"
NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32}


def cache_key(spec: VaeSpec, image_size: int, dtype: str) -> str:
    """What makes two caches interchangeable: the same VAE bytes, the same picture size, the same stored dtype."""
    return f"{spec.sha256}-{image_size}px-{dtype}"


def cache_location(parquet_dir: str, key: str) -> str:
    return join(join(str(parquet_dir), CACHE_FOLDER), key)


def rebuild_command(parquet_dir: str, cfg: Config) -> str:
    sub = f" --vae-subfolder {cfg.vae.subfolder}" if cfg.vae.subfolder else ""
    return f"python jobs/prepare_data.py --existing --out {parquet_dir} --vae {cfg.vae.source}{sub}"


def cached_keys(parquet_dir: str) -> list[str]:
    """The keys of the whole caches beside a set (their metadata.json written)."""
    fs, root = open_folder(str(parquet_dir))
    import pyarrow.fs as pafs

    found = fs.get_file_info(pafs.FileSelector(f"{root}/{CACHE_FOLDER}", allow_not_found=True))
    return sorted(info.base_name for info in found if info.type == pafs.FileType.Directory
                  and is_file(fs, f"{root}/{CACHE_FOLDER}/{info.base_name}/metadata.json"))


# ------------------------------------------------------------------------------------------------ writing


def write_shard(location: str, name: str, latents: np.ndarray, labels: np.ndarray, captions: list[str | None]) -> None:
    """One latent shard (latents (n, c, h, w) in the cache's dtype), written aside and moved in whole."""
    n, per_row = latents.shape[0], latents[0].nbytes
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(per_row), n,
                                                   [None, pa.py_buffer(np.ascontiguousarray(latents).tobytes())])
    table = pa.table({"latent": column, "label": pa.array(np.asarray(labels, np.int16)),
                      "caption": pa.array(captions, pa.string())})
    fs, root = open_folder(location)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/.{name}.partial") as out:
        pq.write_table(table, out)
    fs.move(f"{root}/.{name}.partial", f"{root}/{name}")


def finish(location: str, parquet_dir: str, spec: VaeSpec, image_size: int, dtype: str) -> None:
    """Record the cache's metadata (last: a cache without it is unfinished) from the shards written."""
    meta = read_metadata(parquet_dir)
    fs, root = open_folder(location)
    splits = {}
    for split, entry in meta["splits"].items():
        counts = [pq.read_metadata(f"{root}/{name}", filesystem=fs).num_rows for name in entry["shards"]]
        if sum(counts) != entry["count"]:
            raise DataError(f"the latent cache at {location} holds {sum(counts)} {split} rows for "
                            f"{entry['count']} images; delete it and run the precompute again")
        splits[split] = {**entry, "count": sum(counts)}
    width = meta.get("width", image_size)  # a bucket of an aspect-ratio bucketed set is H×W
    record = {"channels": spec.latent_channels, "image_size": spec.latent_size(image_size), "dtype": dtype,
              **({"width": spec.latent_size(width)} if width != image_size else {}),
              "picture_size": image_size, "picture_channels": meta["channels"], "vae": spec.fingerprint(),
              "images": dataset_digest(parquet_dir), "splits": splits}
    with fs.open_output_stream(f"{root}/metadata.json") as out:
        out.write(json.dumps(record, indent=2).encode())


def missing_shards(parquet_dir: str, location: str) -> list[tuple[str, str]]:
    """(split, shard name) of the image shards whose latent shard is not written yet: what a resumed precompute
    still has to do."""
    meta = read_metadata(parquet_dir)
    fs, root = open_folder(location)
    return [(split, name) for split, entry in meta["splits"].items() for name in entry["shards"]
            if not is_file(fs, f"{root}/{name}")]


# ------------------------------------------------------------------------------------------------ reading


def read_latent_split(location: str, split: str) -> ImageSet:
    """A cached split as an ImageSet whose `images` are latents (N, c, h, w) in the cache's float dtype."""
    meta = read_metadata(location)
    entry, c, s = meta["splits"][split], meta["channels"], meta["image_size"]
    w = meta.get("width", s)
    dtype = NUMPY_DTYPES[meta["dtype"]]
    fs, root = open_folder(location)
    table = pa.concat_tables(read_shard(fs, root, name, location) for name in entry["shards"])
    column = table.column("latent").combine_chunks()
    raw = np.frombuffer(column.buffers()[1], dtype)[column.offset * c * s * w:][: len(table) * c * s * w]
    latents = torch.from_numpy(raw.reshape(len(table), c, s, w).copy())
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    captions = table.column("caption").to_pylist() if entry.get("captioned") else None
    return ImageSet(latents, labels, captions)


@torch.no_grad()
def encode_set(images: ImageSet, vae: FrozenVae, batch_size: int, dtype: str) -> ImageSet:
    """Encode a picture set in memory (the path of a small set with no cache), stored as the cache would be."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chunks = [vae.encode(from_uint8(images.images[i : i + batch_size]).to(device)).cpu()
              for i in range(0, len(images), batch_size)]
    return ImageSet(torch.cat(chunks).to(getattr(torch, dtype)), images.labels, images.captions)


@dataclass(frozen=True)
class LatentSplits:
    train: ImageSet | None  # None only for a bucket without images in that split
    test: ImageSet | None
    line: str  # which path the run took and why


def load_latent_splits(cfg: Config) -> LatentSplits:
    """The train and test splits as latents: the cache made for this VAE, size and dtype; or, for a small set
    without one, encoded once in memory. A stale cache, or one that is missing for a large set, is refused."""
    where = str(cfg.data.parquet_dir)
    meta = read_metadata(where)
    spec = inspect(cfg.vae)
    check_shapes(spec, meta["channels"], meta["image_size"], cfg.model.channels, cfg.model.image_size, where)
    return latents_at(where, cfg, spec, sum(entry["count"] for entry in meta["splits"].values()))


def latents_at(where: str, cfg: Config, spec: VaeSpec, count: int) -> LatentSplits:
    """The latents of the set at `where` (a whole set, or one bucket of a bucketed set whose images number
    `count` in all, which decides whether encoding in memory is allowed)."""
    meta = read_metadata(where)
    key = cache_key(spec, meta["image_size"], cfg.vae.cache_dtype)
    keys = cached_keys(where)
    if key in keys:
        location = cache_location(where, key)
        cached = read_metadata(location)
        if cached["images"] != dataset_digest(where):
            raise DataError(f"the latent cache {location} was made from other images than the set now at {where} "
                            f"(it was rebuilt since); make it again: {rebuild_command(where, cfg)}")
        return LatentSplits(*(read_latent_split(location, split) if split in cached["splits"] else None
                              for split in SPLITS),
                            f"latents: read from the cache {location} (VAE {spec.source}, made once; no VAE loads "
                            f"to train)")
    others = f" (it has caches for other VAEs, sizes or dtypes: {', '.join(keys)}; never reused)" if keys else ""
    if count > cfg.vae.encode_in_memory_max:
        raise DataError(f"{where} has no latent cache for VAE {spec.source} at {meta['image_size']}px in "
                        f"{cfg.vae.cache_dtype}{others}, and its {count:,} images are more than "
                        f"vae.encode_in_memory_max={cfg.vae.encode_in_memory_max:,} to encode at every start: "
                        f"cache them once with {rebuild_command(where, cfg)}")
    vae = FrozenVae(cfg.vae)
    train, test = (encode_set(read_split(where, split), vae, cfg.vae.batch_size, cfg.vae.cache_dtype)
                   if read_metadata(where)["splits"].get(split, {}).get("count") else None for split in SPLITS)
    return LatentSplits(train, test, f"latents: {count:,} images encoded once, in memory, by VAE {spec.source} "
                                     f"(no cache{others}; {rebuild_command(where, cfg)} writes one)")


def bucketed_latents(cfg: Config, meta: dict) -> tuple[BucketedSet, BucketedSet, str]:
    """An aspect-ratio bucketed set's latents, bucket by bucket (each bucket's own cache), as BucketedSets whose
    shapes are the latents' (picture sides / the VAE's factor)."""
    where, spec = str(cfg.data.parquet_dir), inspect(cfg.vae)
    total = sum(entry["count"] for entry in meta["splits"].values())
    splits: dict[str, tuple[list, list]] = {split: ([], []) for split in SPLITS}
    lines = set()
    for name in sorted(meta["buckets"]):
        height, width = (int(v) for v in name.split("x"))
        if height % spec.factor or width % spec.factor:
            raise DataError(f"bucket {name} of {where} is not a multiple of the VAE's {spec.factor}× downsampling: "
                            f"re-import with --bucket-multiple {spec.factor * cfg.model.patch_size}")
        found = latents_at(join(where, name), cfg, spec, total)
        lines.add(found.line.split(" (")[0].replace(join(where, name), where))
        for split, part in zip(SPLITS, (found.train, found.test)):
            if part is not None and len(part):
                splits[split][0].append((height // spec.factor, width // spec.factor))
                splits[split][1].append(part)
    train, test = (BucketedSet(*splits[split]) for split in SPLITS)
    return train, test, f"{'; '.join(sorted(lines))} for each of {len(meta['buckets'])} buckets"


def load_model_splits(cfg: Config, announce: bool = True) -> tuple[Any, Any]:
    """The loop's step: the train and test splits in what the model takes, held in memory: the pictures in pixel
    space (a `BucketedSet` for an aspect-ratio bucketed set), their latents in latent space (saying which path,
    when `announce`)."""
    meta = read_metadata(cfg.data.parquet_dir)
    if is_bucketed(meta):
        if announce:
            listed = ", ".join(f"{name} ({counts['train']:,})" for name, counts in meta["buckets"].items())
            print(f"sd3ray: aspect-ratio buckets (height x width, training images): {listed}", flush=True)
        if uses_vae(cfg.vae):
            train, test, line = bucketed_latents(cfg, meta)
            if announce:
                print(f"sd3ray: {line}", flush=True)
            return train, test
        return read_bucketed_split(cfg.data.parquet_dir, "train"), read_bucketed_split(cfg.data.parquet_dir, "test")
    if not uses_vae(cfg.vae):
        return load_splits(cfg)
    check_image_set(cfg)
    latents = load_latent_splits(cfg)
    if announce:
        print(f"sd3ray: {latents.line}", flush=True)
    return latents.train, latents.test
