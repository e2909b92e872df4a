"""The streaming path on Ray: a Ray Data pipeline that reads the training shards and decodes them on CPU tasks
(scheduled apart from the training workers, so CPU nodes can feed GPU ones), split across the workers with
`streaming_split` by Ray Train. See `sd3ray.data.streaming` for what a worker does with its shard and what a resume
guarantees."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import ray
import ray.data
import ray.train

from sd3ray.config import Config
from sd3ray.data.format import read_metadata
from sd3ray.data.streaming import Batch, decode, shard_paths

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
