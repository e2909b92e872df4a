"""Each step's batch from the in-memory training set: the step's shuffle (the same on every rank for a step and seed),
each rank's slice of it, and the prompt each image is trained with this time.
"""

from __future__ import annotations

import torch

from sd3ray.config import Config
from sd3ray.core.flow import sample_timesteps
from sd3ray.data.format import ImageSet, check_fits_model, to_model_space
from sd3ray.data.prompts import PromptBank, Tokenize, default_tokenize, digit_prompts
from sd3ray.errors import DataError

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
    Random draws are made for the global batch and sliced per rank, so the split over workers changes nothing."""

    def __init__(self, images: ImageSet, cfg: Config, rank: int, world_size: int, device: torch.device,
                 tokenize: Tokenize | None = None) -> None:
        check_fits_model(images.images.shape[1], images.images.shape[-1], cfg, cfg.data.parquet_dir)
        prompts, candidates = prompt_candidates(images)
        self.bank = PromptBank.build(prompts, tokenize or default_tokenize(cfg.text)).to(device)
        row_of = {p: i for i, p in enumerate(self.bank.prompts)}
        self.candidates = torch.tensor([row_of[p] for p in prompts])[candidates].to(device)  # (N, K) bank rows
        self.images = images.images.to(device)  # uint8, resident: MNIST is 60 MB
        self.sampler = ShardedBatches(len(images), cfg.train.batch_size, rank, world_size, cfg.train.seed)
        self.global_batch = self.sampler.global_batch
        self.cfg, self.device = cfg, device
        b = cfg.train.batch_size
        self.rank_slice = slice(rank * b, (rank + 1) * b)

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        """x0 (b,C,H,W) in [-1,1], ids and mask (b,L), t (b,), eps (b,C,H,W)."""
        g = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed * 1_000_003 + step)
        n, sl = self.sampler.global_batch, self.rank_slice
        t = sample_timesteps(self.cfg.flow, n, g, self.device)[sl]
        eps = torch.randn((n, *self.images.shape[1:]), generator=g, device=self.device)[sl]
        choice = torch.randint(0, self.candidates.shape[1], (n,), generator=g, device=self.device)[sl]
        dropped = (torch.rand(n, generator=g, device=self.device) < self.cfg.text.prompt_dropout)[sl]
        index = self.sampler.indices(step).to(self.device, non_blocking=True)
        rows = torch.where(dropped, 0, self.candidates[index, choice])  # bank row 0 is the empty prompt
        return to_model_space(self.images[index]), self.bank.ids[rows], self.bank.mask[rows], t, eps
