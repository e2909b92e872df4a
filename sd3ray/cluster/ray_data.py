"""The streaming path on Ray: a Ray Data pipeline that reads the training shards and decodes them on CPU tasks
(scheduled apart from the training workers, so CPU nodes can feed GPU ones), split across the workers with
`streaming_split` by Ray Train. See `sd3ray.data.streaming` for what a worker does with its shard and what a resume
guarantees. Also the one-off passes that encode a set's prompts with frozen text encoders, and its pictures with a
frozen VAE (the latent cache, `sd3ray.data.latents`), on Ray Data actors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
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
from sd3ray.data.latents import NUMPY_DTYPES, cache_key, cache_location, finish, missing_shards, write_shard
from sd3ray.data.streaming import Batch, decode, shard_paths
from sd3ray.data.text_embeddings import data_prompts, write_table
from sd3ray.model.pretrained_text import PretrainedTextEncoder, fingerprint, inspect, joined_dims
from sd3ray.model.vae import FrozenVae
from sd3ray.model.vae import check_shapes as check_vae_shapes
from sd3ray.model.vae import inspect as inspect_vae
from sd3ray.storage import open_folder

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
    GPU in bf16 if it has one, else on CPU in fp32), stored in the cache's dtype; each row keeps its shard's name."""

    def __init__(self, vae_cfg: VaeConfig, channels: int, image_size: int) -> None:
        import torch

        self.vae, self.channels, self.size = FrozenVae(vae_cfg), channels, image_size
        self.dtype = NUMPY_DTYPES[vae_cfg.cache_dtype]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            self.vae.load(self.device).to(torch.bfloat16)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        import torch

        pictures = torch.from_numpy(image_array(batch, self.channels, self.size, "a shard"))
        latents = self.vae.encode(from_uint8(pictures).to(self.device)).cpu().numpy().astype(self.dtype)
        return {"latent": latents, "label": batch.column("label").to_numpy(),
                "caption": np.array(batch.column("caption").to_pylist(), dtype=object),
                "shard": np.array([PurePosixPath(p).name for p in batch.column("path").to_pylist()], dtype=object)}


def bound(actor: type, *args: object) -> type:
    """`actor` with its constructor's arguments built in: Ray Data would otherwise keep them in the object store
    for restarts and warn about it once per actor."""
    return type(actor.__name__, (actor,), {"__init__": lambda self: actor.__init__(self, *args)})


def precompute_latents(parquet_dir: str, vae_cfg: VaeConfig, actors: int = 1, gpus_per_actor: float = 0.0,
                       batch_size: int = 64, on_shard: Callable[[str, int], None] | None = None) -> tuple[str, int]:
    """Encode every picture of the set once with Ray Data (`map_batches` over `actors` VAE actors, on GPUs when
    `gpus_per_actor` > 0) into the latent cache beside its shards, one latent shard per image shard, each written
    as soon as all its rows are back. Shards already written are kept, so an interrupted run resumes where it
    stopped. Returns (cache location, shards encoded now)."""
    meta = read_metadata(parquet_dir)
    spec = inspect_vae(vae_cfg)
    check_vae_shapes(spec, meta["channels"], meta["image_size"], spec.latent_channels,
                     spec.latent_size(meta["image_size"]), parquet_dir)
    location = cache_location(parquet_dir, cache_key(spec, meta["image_size"], vae_cfg.cache_dtype))
    todo = [name for _, name in missing_shards(parquet_dir, location)]
    if todo:
        quiet_ray_data()
        fs, root = open_folder(parquet_dir)
        paths = [f"{root}/{name}" for name in todo]
        expected = {name: pq.read_metadata(path, filesystem=fs).num_rows for name, path in zip(todo, paths)}
        dataset = ray.data.read_parquet(paths, filesystem=fs, columns=["image", "label", "caption"],
                                        include_paths=True)
        encoded = dataset.map_batches(bound(EncodePictures, vae_cfg, meta["channels"], meta["image_size"]),
                                      batch_size=batch_size, batch_format="pyarrow",
                                      compute=ray.data.ActorPoolStrategy(size=actors),
                                      num_gpus=gpus_per_actor or None, num_cpus=None if gpus_per_actor else 1)
        pending: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in todo}
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            for name in np.unique(batch["shard"]):
                rows = batch["shard"] == name
                pending[name].append({key: batch[key][rows] for key in ("latent", "label", "caption")})
                if sum(len(part["label"]) for part in pending[name]) == expected[name]:
                    parts = pending.pop(name)
                    write_shard(location, name, *(np.concatenate([p[key] for p in parts])
                                                  for key in ("latent", "label")),
                                [c for p in parts for c in p["caption"]])
                    if on_shard is not None:
                        on_shard(name, expected[name])
    finish(location, parquet_dir, spec, meta["image_size"], vae_cfg.cache_dtype)
    return location, len(todo)


def quiet_ray_data() -> None:
    """One line per shard says what a precompute did, not Ray Data's progress log."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
