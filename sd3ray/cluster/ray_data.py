"""The streaming path on Ray: a Ray Data pipeline that reads the training shards and decodes them on CPU tasks
(scheduled apart from the training workers, so CPU nodes can feed GPU ones), split across the workers with
`streaming_split` by Ray Train. See `sd3ray.data.streaming` for what a worker does with its shard and what a resume
guarantees. Also the one-off passes that encode a set's prompts with frozen text encoders, and its pictures with a
frozen VAE (the latent cache, `sd3ray.data.latents`), on Ray Data actors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train

from sd3ray.config import Config, TextConfig, VaeConfig
from sd3ray.data.format import from_uint8, image_array, read_metadata
from sd3ray.data.latents import (
    CACHE_FOLDER,
    NUMPY_DTYPES,
    cache_key,
    cache_location,
    finish,
    missing_shards,
    write_shard,
)
from sd3ray.data.streaming import Batch, decode, shard_paths
from sd3ray.data.text_embeddings import data_prompts, write_table
from sd3ray.errors import DataError
from sd3ray.model.pretrained_text import PretrainedTextEncoder, fingerprint, inspect, joined_dims
from sd3ray.model.vae import FrozenVae, VaeSpec
from sd3ray.model.vae import check_shapes as check_vae_shapes
from sd3ray.model.vae import inspect as inspect_vae
from sd3ray.storage import join, open_folder

TRAIN_DATASET = "train"


def train_dataset(cfg: Config) -> ray.data.Dataset:
    """The training split as a Ray Dataset of decoded batches: shards read in a new seeded order each pass
    (`FileShuffleConfig` reseeds after every execution), decoded 1,024 rows at a time on 1-CPU tasks."""
    meta = read_metadata(cfg.data.parquet_dir)
    fs, paths = shard_paths(cfg.data.parquet_dir)
    dataset = ray.data.read_parquet(paths, filesystem=fs, columns=["image", "label", "caption"],
                                    shuffle=ray.data.FileShuffleConfig(seed=cfg.train.seed))
    decoder = partial(decode, channels=meta["channels"], image_size=meta["image_size"],
                      captioned=bool(meta["splits"]["train"].get("captioned")))
    return dataset.map_batches(decoder, batch_format="pyarrow", batch_size=1024, num_cpus=1)


def shard_passes(cfg: Config, rank: int) -> Callable[[], Iterable[Batch]]:
    """A worker's side: each call iterates this worker's split of the dataset once, in exact batches, shuffled
    through a local buffer and prefetched while the step runs."""
    shard = ray.train.get_dataset_shard(TRAIN_DATASET)
    if shard is None:
        raise RuntimeError("the run streams its data, but the trainer was built without a training dataset")
    buffer = cfg.data.shuffle_buffer or None
    return partial(shard.iter_batches, batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=True,
                   prefetch_batches=cfg.data.prefetch_batches, local_shuffle_buffer_size=buffer,
                   local_shuffle_seed=cfg.train.seed * 1009 + rank if buffer else None)


class EncodePrompts:
    """A Ray Data actor: loads the frozen encoders once, then encodes batches of prompts (on its GPU if it has one)."""

    def __init__(self, text: TextConfig) -> None:
        import torch

        context_dim, pooled_dim = joined_dims([inspect(source) for source in text.encoder])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = PretrainedTextEncoder(text, context_dim, pooled_dim).to(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        context, pooled, mask = self.encoder.encode([str(p) for p in batch["prompt"]])
        return {"prompt": batch["prompt"], "context": context.cpu().numpy(), "pooled": pooled.cpu().numpy(),
                "mask": mask.cpu().numpy()}


def precompute_text_embeddings(parquet_dir: str, text: TextConfig, actors: int = 1, gpus_per_actor: float = 0.0,
                               batch_size: int = 64) -> tuple[str, int]:
    """Encode every distinct prompt of the set once with Ray Data (`map_batches` over `actors` encoder actors, on
    GPUs when `gpus_per_actor` > 0) and write `text_embeddings.parquet` beside its shards. Returns (path, prompts)."""
    prompts = data_prompts(parquet_dir)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one line says what it did, not a progress log
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.from_items([{"prompt": p} for p in prompts])
    encoded = dataset.map_batches(EncodePrompts, fn_constructor_args=(text,), batch_size=batch_size,
                                  compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor or None,
                                  num_cpus=None if gpus_per_actor else 1).take_all()
    order = {p: i for i, p in enumerate(prompts)}
    encoded.sort(key=lambda row: order[str(row["prompt"])])
    stack = lambda key: np.stack([row[key] for row in encoded])  # noqa: E731
    path = write_table(parquet_dir, [str(row["prompt"]) for row in encoded], stack("context"), stack("pooled"),
                       stack("mask"), fingerprint(text))
    return path, len(encoded)


class EncodePictures:
    """A Ray Data actor: loads the frozen VAE once, then encodes batches of pictures into normalised latents (on its
    GPU in bf16 if it has one, else on CPU in fp32), stored in the cache's dtype. A batch may hold rows of several
    sets (the buckets of a bucketed set, each its own H×W): each row's set is its shard's folder, so latents leave
    as bytes, with the set and shard they belong to."""

    def __init__(self, vae_cfg: VaeConfig, channels: int, shapes: dict[str, tuple[int, int]]) -> None:
        import torch

        self.vae, self.channels, self.shapes = FrozenVae(vae_cfg), channels, shapes
        self.dtype = NUMPY_DTYPES[vae_cfg.cache_dtype]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            self.vae.load(self.device).to(torch.bfloat16)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        import torch

        paths = [PurePosixPath(p) for p in batch.column("path").to_pylist()]
        units = np.array([p.parent.name for p in paths], dtype=object)
        latents = np.empty(len(batch), dtype=object)
        for unit in np.unique(units):
            rows = np.flatnonzero(units == unit)
            height, width = self.shapes[unit]
            pictures = image_array(batch.take(rows), self.channels, height, f"a shard of {unit}", width)
            encoded = self.vae.encode(from_uint8(torch.from_numpy(pictures)).to(self.device)).cpu().numpy()
            latents[rows] = [row.astype(self.dtype).tobytes() for row in encoded]
        return {"latent": latents, "label": batch.column("label").to_numpy(), "unit": units,
                "caption": np.array(batch.column("caption").to_pylist(), dtype=object),
                "shard": np.array([p.name for p in paths], dtype=object)}


def bound(actor: type, *args: object) -> type:
    """`actor` with its constructor's arguments built in: Ray Data would otherwise keep them in the object store
    for restarts and warn about it once per actor."""
    return type(actor.__name__, (actor,), {"__init__": lambda self: actor.__init__(self, *args)})


@dataclass(frozen=True)
class LatentUnit:
    """One set of one picture shape and its cache: a whole square set, or one bucket of a bucketed set."""

    folder: str
    meta: dict
    location: str
    todo: list[str]  # its image shards without a latent shard yet


def latent_units(parquet_dir: str, spec: VaeSpec, dtype: str) -> list[LatentUnit]:
    meta = read_metadata(parquet_dir)
    folders = [join(parquet_dir, name) for name in sorted(meta["buckets"])] if "buckets" in meta else [parquet_dir]
    units = []
    for folder in folders:
        unit_meta = read_metadata(folder)
        height, width = unit_meta["image_size"], unit_meta.get("width", unit_meta["image_size"])
        check_vae_shapes(spec, unit_meta["channels"], height, spec.latent_channels, spec.latent_size(height), folder)
        if width % spec.factor:
            raise DataError(f"{folder} holds pictures {width} wide, not a multiple of the VAE's {spec.factor}× "
                            f"downsampling; re-import with --bucket-multiple a multiple of {spec.factor}")
        location = cache_location(folder, cache_key(spec, height, dtype))
        units.append(LatentUnit(folder, unit_meta, location, [name for _, name in missing_shards(folder, location)]))
    return units


def precompute_latents(parquet_dir: str, vae_cfg: VaeConfig, actors: int = 1, gpus_per_actor: float = 0.0,
                       batch_size: int = 64, on_shard: Callable[[str, int], None] | None = None) -> tuple[str, int]:
    """Encode every picture of the set once with Ray Data (`map_batches` over `actors` VAE actors, on GPUs when
    `gpus_per_actor` > 0) into the latent cache beside its shards (each bucket's beside its own, in one pass), one
    latent shard per image shard, each written as soon as all its rows are back. Shards already written are kept,
    so an interrupted run resumes where it stopped. Returns (cache location, shards encoded now)."""
    spec = inspect_vae(vae_cfg)
    units = {PurePosixPath(open_folder(u.folder)[1]).name: u for u in latent_units(parquet_dir, spec,
                                                                                  vae_cfg.cache_dtype)}
    todo = [(key, name) for key, unit in units.items() for name in unit.todo]
    if todo:
        quiet_ray_data()
        fs, _ = open_folder(parquet_dir)
        paths = {(key, name): f"{open_folder(units[key].folder)[1]}/{name}" for key, name in todo}
        expected = {item: pq.read_metadata(path, filesystem=fs).num_rows for item, path in paths.items()}
        shapes = {key: (u.meta["image_size"], u.meta.get("width", u.meta["image_size"])) for key, u in units.items()}
        channels = next(iter(units.values())).meta["channels"]
        dataset = ray.data.read_parquet(list(paths.values()), filesystem=fs, columns=["image", "label", "caption"],
                                        include_paths=True)
        encoded = dataset.map_batches(bound(EncodePictures, vae_cfg, channels, shapes), batch_size=batch_size,
                                      batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
                                      num_gpus=gpus_per_actor or None, num_cpus=None if gpus_per_actor else 1)
        pending: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {item: [] for item in todo}
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            for item in {(str(k), str(n)) for k, n in zip(batch["unit"], batch["shard"])}:
                rows = (batch["unit"] == item[0]) & (batch["shard"] == item[1])
                pending[item].append({key: batch[key][rows] for key in ("latent", "label", "caption")})
                if sum(len(part["label"]) for part in pending[item]) == expected[item]:
                    write_unit_shard(units[item[0]], spec, vae_cfg.cache_dtype, item[1], pending.pop(item))
                    if on_shard is not None:
                        on_shard(f"{item[0]}/{item[1]}" if len(units) > 1 else item[1], expected[item])
    for unit in units.values():
        finish(unit.location, unit.folder, spec, unit.meta["image_size"], vae_cfg.cache_dtype)
    where = units[next(iter(units))].location if len(units) == 1 else join(parquet_dir, "*/" + CACHE_FOLDER)
    return where, len(todo)


def write_unit_shard(unit: LatentUnit, spec: VaeSpec, dtype: str, name: str, parts: list[dict]) -> None:
    """The latent shard `name` of `unit` from the rows the actors sent back (latents as bytes)."""
    height, width = unit.meta["image_size"], unit.meta.get("width", unit.meta["image_size"])
    raw = b"".join(bytes(b) for part in parts for b in part["latent"])
    latents = np.frombuffer(raw, NUMPY_DTYPES[dtype]).reshape(-1, spec.latent_channels, spec.latent_size(height),
                                                              spec.latent_size(width))
    write_shard(unit.location, name, latents, np.concatenate([p["label"] for p in parts]),
                [c for p in parts for c in p["caption"]])


def quiet_ray_data() -> None:
    """One line per shard says what a precompute did, not Ray Data's progress log."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
