"""The streaming path on Ray: a Ray Data pipeline that reads the training shards and decodes them on CPU tasks
(scheduled apart from the training workers, so CPU nodes can feed GPU ones), split across the workers with
`streaming_split` by Ray Train. See `sd3ray.data.streaming` for what a worker does with its shard and what a resume
guarantees. Also the one-off pass that encodes a set's prompts with frozen text encoders on Ray Data actors."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial

import numpy as np
import ray
import ray.data
import ray.train

from sd3ray.config import Config, TextConfig
from sd3ray.data.format import read_metadata
from sd3ray.data.streaming import Batch, decode, shard_paths
from sd3ray.data.text_embeddings import data_prompts, write_table
from sd3ray.model.pretrained_text import PretrainedTextEncoder, fingerprint, inspect, joined_dims

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
