"""The streaming data path: training batches read from Parquet shards as the run goes, for sets that do not fit in
memory. On Ray, Ray Data reads and decodes on CPU (`sd3ray.cluster.ray_data`) and each worker iterates its shard; in
local mode a pyarrow reader streams the shards in this process. Both hand the loop the same contract as the in-memory
path: x0 in [-1, 1], prompt ids and mask, t and eps.

What a resume guarantees (the in-memory path is bit-exact instead):
- the step, learning rate, and every random draw of the loop (t, eps, prompt choice and dropout) continue exactly:
  they are functions of (seed, step), as in memory;
- the data pass that was interrupted starts again from the beginning, in a new order: the samples it had already
  given may be seen twice, and none of the pass is skipped. Each pass gives every worker the same number of batches
  and every sample once across the workers (up to fewer than one global batch left over, dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sd3ray.config import Config, ConfigError
from sd3ray.core.flow import sample_timesteps
from sd3ray.data.format import check_fits_model, from_uint8, image_array, read_metadata
from sd3ray.data.prompts import Tokenize, default_tokenize, digit_prompts
from sd3ray.errors import DataError
from sd3ray.model.vae import inspect, uses_vae
from sd3ray.storage import open_folder

Batch = dict[str, np.ndarray]  # "image" (n, C, S, S) uint8, "label" (n,) int64, "caption" (n,) object or absent


def train_split_bytes(parquet_dir: str | Path) -> int:
    """The decoded size of the train split: what the in-memory path would hold."""
    meta = read_metadata(parquet_dir)
    return meta["splits"]["train"]["count"] * meta["channels"] * meta["image_size"] ** 2


def loading_choice(cfg: Config) -> tuple[bool, int]:
    """(whether this run streams its training data, the train split's decoded bytes): `data.loading` memory/stream,
    or `auto` by that size against `data.stream_above_mb`. Reads metadata.json once."""
    size = train_split_bytes(cfg.data.parquet_dir)
    if uses_vae(cfg.vae):  # SD3's latents are 6× smaller than their pictures (16 float16 for 3×8×8 bytes)
        if cfg.data.loading == "stream":
            raise ConfigError("data.loading=stream: latent space trains from its latent cache held in memory (SD3's "
                              "latents of a 256px picture are 32 KB in float16); set data.loading=memory or auto")
        spec, itemsize = inspect(cfg.vae), 2 if cfg.vae.cache_dtype == "float16" else 4
        meta = read_metadata(cfg.data.parquet_dir)
        per_image = spec.latent_channels * spec.latent_size(meta["image_size"]) ** 2 * itemsize
        return False, meta["splits"]["train"]["count"] * per_image
    if "buckets" in read_metadata(cfg.data.parquet_dir):  # one bucket a step, drawn from memory
        if cfg.data.loading == "stream":
            raise ConfigError("data.loading=stream: an aspect-ratio bucketed set trains from memory (one bucket a "
                              "step); set data.loading=memory or auto")
        return False, size
    if cfg.data.loading != "auto":
        return cfg.data.loading == "stream", size
    return size > cfg.data.stream_above_mb * 2**20, size


def streams(cfg: Config) -> bool:
    return loading_choice(cfg)[0]


def describe_choice(cfg: Config) -> str:
    streamed, size = loading_choice(cfg)
    how = "streamed from its shards" if streamed else "held in memory"
    why = f"data.loading={cfg.data.loading}" if cfg.data.loading != "auto" else \
        f"{'above' if streamed else 'within'} data.stream_above_mb={cfg.data.stream_above_mb:g}"
    if uses_vae(cfg.vae):
        return f"sd3ray: the train split's latents ({size / 2**20:,.1f} MB) are held in memory (latent space)"
    return f"sd3ray: the train split ({size / 2**20:,.0f} MB decoded) is {how} ({why})"


def shard_paths(parquet_dir: str | Path, split: str = "train") -> tuple[object, list[str]]:
    """The split's filesystem and shard paths on it."""
    meta = read_metadata(parquet_dir)
    fs, root = open_folder(parquet_dir)
    return fs, [f"{root}/{name}" for name in meta["splits"][split]["shards"]]


def decode(table: pa.Table, channels: int, image_size: int, captioned: bool) -> Batch:
    """A Parquet record batch -> numpy columns: images as (n, C, S, S) uint8, labels, and for a captioned set
    its captions ("" where missing)."""
    out: Batch = {"image": image_array(table, channels, image_size, "a streamed batch"),
                  "label": table.column("label").to_numpy().astype(np.int64)}
    if captioned:
        out["caption"] = np.array([c or "" for c in table.column("caption").to_pylist()], dtype=object)
    return out


class LocalParquetStream:
    """Local mode's reader: every pass visits the shards in a seeded order and shuffles rows through a buffer of
    `buffer_size`, yielding exact batches of `batch_size` (the last partial batch is dropped)."""

    def __init__(self, parquet_dir: str | Path, batch_size: int, seed: int, buffer_size: int = 4096) -> None:
        meta = read_metadata(parquet_dir)
        self.channels, self.image_size = meta["channels"], meta["image_size"]
        self.captioned = bool(meta["splits"]["train"].get("captioned"))
        self.fs, self.paths = shard_paths(parquet_dir)
        self.batch_size, self.seed, self.buffer_size = batch_size, seed, max(buffer_size, batch_size)
        self.passes = 0

    def __iter__(self) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.passes])
        self.passes += 1
        buffer: list[Batch] = []
        held = 0
        for index in rng.permutation(len(self.paths)):
            with self.fs.open_input_file(self.paths[index]) as f:
                for record_batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                    table = pa.Table.from_batches([record_batch])
                    buffer.append(decode(table, self.channels, self.image_size, self.captioned))
                    held += record_batch.num_rows
                    if held >= self.buffer_size:
                        yield from self._drain(buffer, rng, keep=self.buffer_size // 2)
                        held = sum(len(b["label"]) for b in buffer)
        yield from self._drain(buffer, rng, keep=0)

    def _drain(self, buffer: list[Batch], rng: np.random.Generator, keep: int) -> Iterator[Batch]:
        """Shuffle what the buffer holds and yield whole batches until at most `keep` rows are left in it."""
        if not buffer:  # an empty split: StreamedBatches says so
            return
        merged = {key: np.concatenate([b[key] for b in buffer]) for key in buffer[0]}
        order = rng.permutation(len(merged["label"]))
        merged = {key: value[order] for key, value in merged.items()}
        n = len(order)
        cut = max(0, (n - keep) // self.batch_size * self.batch_size)
        for start in range(0, cut, self.batch_size):
            yield {key: value[start:start + self.batch_size] for key, value in merged.items()}
        buffer.clear()
        if cut < n:
            buffer.append({key: value[cut:] for key, value in merged.items()})


class StreamedBatches:
    """Each step's batch for this rank from a stream of exact batches (`passes` makes a fresh pass over this
    rank's share of the data each time it is called). The random draws are those of the in-memory path, made for
    the global batch from (seed, step) and sliced per rank, so only the images differ between the two paths."""

    def __init__(self, passes: Callable[[], Iterable[Batch]], cfg: Config, rank: int, world_size: int,
                 device: torch.device, tokenize: Tokenize | None = None) -> None:
        self.passes, self.cfg, self.device = passes, cfg, device
        self.tokenize = tokenize or default_tokenize(cfg.text)  # the model's text encoder's, or the byte one
        self.global_batch = cfg.train.batch_size * world_size
        b = cfg.train.batch_size
        self.rank_slice = slice(rank * b, (rank + 1) * b)
        self._batches: Iterator[Batch] = iter(())
        self.passes_started = 0

    def _next(self) -> Batch:
        for attempt in range(2):
            try:
                return next(self._batches)
            except StopIteration:
                if attempt:  # a fresh pass gave nothing
                    raise DataError("the training data stream is empty: fewer images than one batch per worker "
                                    "(train.batch_size); lower the batch size or add data") from None
                self._batches, self.passes_started = iter(self.passes()), self.passes_started + 1
        raise AssertionError("unreachable")

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        """x0 (b,C,H,W) in [-1,1], ids and mask (b,L), t (b,), eps (b,C,H,W)."""
        batch = self._next()
        images = torch.as_tensor(batch["image"]).to(self.device, non_blocking=True)
        if images.shape[0] != self.cfg.train.batch_size:
            raise DataError(f"the stream gave a batch of {images.shape[0]}, not train.batch_size "
                            f"{self.cfg.train.batch_size}")
        check_fits_model(images.shape[1], images.shape[-1], self.cfg, self.cfg.data.parquet_dir)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed * 1_000_003 + step)
        n, sl = self.global_batch, self.rank_slice
        tokens = (self.cfg.model.image_size // self.cfg.model.patch_size) ** 2
        t = sample_timesteps(self.cfg.flow, n, g, self.device, tokens)[sl]
        eps = torch.randn((n, *images.shape[1:]), generator=g, device=self.device)[sl]
        choice = torch.randint(0, 1 << 30, (n,), generator=g, device=self.device)[sl].tolist()
        dropped = (torch.rand(n, generator=g, device=self.device) < self.cfg.text.prompt_dropout)[sl].tolist()
        prompts = self.prompts(batch, choice)
        ids, mask = self.tokenize(["" if d else p for p, d in zip(prompts, dropped)])
        return from_uint8(images), ids.to(self.device), mask.to(self.device), t, eps

    @staticmethod
    def prompts(batch: Batch, choice: list[int]) -> list[str]:
        """Captions where the set has them, else one rendering of each digit label, picked by `choice`."""
        if "caption" in batch:
            return list(batch["caption"])
        labels = batch["label"].tolist()
        if any(not 0 <= y <= 9 for y in labels):
            raise DataError("images have neither captions nor digit labels 0–9; add a caption column")
        return [(options := digit_prompts(y))[c % len(options)] for y, c in zip(labels, choice)]
