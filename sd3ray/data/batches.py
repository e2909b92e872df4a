"""Each step's batch from the in-memory training set: the step's shuffle (the same on every rank for a step and seed),
each rank's slice of it, and the prompt each image is trained with this time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sd3ray.config import Config
from sd3ray.core.flow import sample_timesteps
from sd3ray.data.buckets import BucketSchedule
from sd3ray.data.format import ImageSet, check_fits_model, to_model_space
from sd3ray.data.prompts import PromptBank, Tokenize, default_tokenize, digit_prompts
from sd3ray.errors import DataError

if TYPE_CHECKING:
    from sd3ray.data.bucketed_sets import BucketedSet

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
    `tokenize` is the model's text encoder's (the byte tokenizer by default): every prompt is tokenised once.
    Random draws are made for the global batch and sliced per rank, so the split over workers changes nothing.
    `sampled=False` leaves the choice of images to the caller (`BucketedBatches`: one bucket's images)."""

    def __init__(self, images: ImageSet, cfg: Config, rank: int, world_size: int, device: torch.device,
                 tokenize: Tokenize | None = None, sampled: bool = True) -> None:
        if sampled:
            check_fits_model(images.images.shape[1], images.images.shape[-1], cfg, cfg.data.parquet_dir)
        prompts, candidates = prompt_candidates(images)
        self.bank = PromptBank.build(prompts, tokenize or default_tokenize(cfg.text)).to(device)
        row_of = {p: i for i, p in enumerate(self.bank.prompts)}
        self.candidates = torch.tensor([row_of[p] for p in prompts])[candidates].to(device)  # (N, K) bank rows
        self.images = images.images.to(device)  # uint8, resident: MNIST is 60 MB
        b = cfg.train.batch_size
        self.global_batch = b * world_size
        self.sampler = ShardedBatches(len(images), b, rank, world_size, cfg.train.seed) if sampled else None
        self.cfg, self.device = cfg, device
        self.rank_slice = slice(rank * b, (rank + 1) * b)
        p = cfg.model.patch_size
        self.tokens = (self.images.shape[-2] // p) * (self.images.shape[-1] // p)  # what flow.shift=auto reads

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        """x0 (b,C,H,W) in [-1,1], ids and mask (b,L), t (b,), eps (b,C,H,W)."""
        return self.gather(step, self.sampler.indices(step))

    def gather(self, step: int, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The step's batch of this rank's images `index` (b,) of the set."""
        g = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed * 1_000_003 + step)
        n, sl = self.global_batch, self.rank_slice
        t = sample_timesteps(self.cfg.flow, n, g, self.device, self.tokens)[sl]
        eps = torch.randn((n, *self.images.shape[1:]), generator=g, device=self.device)[sl]
        choice = torch.randint(0, self.candidates.shape[1], (n,), generator=g, device=self.device)[sl]
        dropped = (torch.rand(n, generator=g, device=self.device) < self.cfg.text.prompt_dropout)[sl]
        index = index.to(self.device, non_blocking=True)
        rows = torch.where(dropped, 0, self.candidates[index, choice])  # bank row 0 is the empty prompt
        return to_model_space(self.images[index]), self.bank.ids[rows], self.bank.mask[rows], t, eps


class BucketedBatches:
    """Each step's batch from an aspect-ratio bucketed set: the bucket and its images from `BucketSchedule` (the
    same on every rank at a step), then the draws of `TrainingBatches` at that bucket's shape."""

    def __init__(self, data: BucketedSet, cfg: Config, rank: int, world_size: int, device: torch.device,
                 tokenize: Tokenize | None = None) -> None:
        check_buckets_fit(data.buckets, data.parts[0].images.shape[1], cfg)
        self.parts = [TrainingBatches(part, cfg, rank, world_size, device, tokenize, sampled=False)
                      for part in data.parts]
        self.global_batch = self.parts[0].global_batch
        self.schedule = BucketSchedule([len(part) for part in data.parts], self.global_batch, cfg.train.seed)
        self.rank_slice = self.parts[0].rank_slice

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        chosen = self.schedule.at(step)
        return self.parts[chosen.bucket].gather(step, chosen.indices[self.rank_slice])


def check_buckets_fit(buckets: list[tuple[int, int]], channels: int, cfg: Config) -> None:
    """A bucketed set trains a model whose positions are cropped from SD3's table (any grid up to its side)."""
    m = cfg.model
    if channels != m.channels:
        raise DataError(f"the bucketed set at {cfg.data.parquet_dir} holds {channels}-channel images, the model takes "
                        f"{m.channels}: set model.channels={channels}")
    bad = [f"{h}x{w}" for h, w in buckets if h % m.patch_size or w % m.patch_size]
    if bad:
        raise DataError(f"buckets {bad} are not multiples of model.patch_size={m.patch_size}: re-import with "
                        f"--bucket-multiple {m.patch_size} (or a multiple of it)")
    grid = max(max(h, w) for h, w in buckets) // m.patch_size
    if m.pos_embed_max_size < grid:
        raise DataError(f"the largest bucket is {grid} patches per side: model.pos_embed_max_size must cover it "
                        f"(SD3's position table, centre-cropped to each bucket's grid); set "
                        f"model.pos_embed_max_size={grid} or more")
