"""Aspect-ratio buckets: each image trains at a shape close to its own instead of being cropped or padded to a square.

At import, an image of h×w pixels goes to the bucket (H, W) whose aspect is its own (clamped to `max_aspect`) and
whose area is closest to the target area, both sides multiples of `multiple` (the patch, times the VAE's factor in
latent space); it is resized to exactly that shape, which moves its aspect by at most the rounding to `multiple`.

In training, a batch holds one bucket. Every epoch, each bucket's images are shuffled and cut into global batches
(the remainder waits for the next epoch's shuffle), and the list of all buckets' batches is shuffled: the batch of a
step is a pure function of (seed, step), so every DDP rank draws the same bucket at the same step and a resume is
exact from the step alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from sd3ray.errors import DataError

Bucket = tuple[int, int]  # (height, width) in pixels
SIZE = re.compile(r"^\s*(\d+)\s*[x×]\s*(\d+)\s*$")


def bucket_for(height: int, width: int, target_area: int, multiple: int, max_aspect: float) -> Bucket:
    """The (H, W) an h×w image trains at: its aspect clamped to [1/max_aspect, max_aspect], area ≈ target_area,
    both sides the nearest multiples of `multiple` (at least one)."""
    if height <= 0 or width <= 0:
        raise DataError(f"an image of {width}×{height} pixels has no area")
    aspect = min(max(width / height, 1 / max_aspect), max_aspect)
    rows, cols = math.sqrt(target_area / aspect), math.sqrt(target_area * aspect)
    snap = lambda side: max(multiple, round(side / multiple) * multiple)  # noqa: E731
    return snap(rows), snap(cols)


def bucket_name(bucket: Bucket) -> str:
    """'HxW', as the metadata and shard folders name a bucket."""
    return f"{bucket[0]}x{bucket[1]}"


def parse_size(text: str, multiple: int) -> Bucket:
    """'WxH' (width first, as image tools write it) -> (H, W), both multiples of `multiple`, or one message."""
    match = SIZE.match(text)
    if match is None:
        raise DataError(f"size {text!r}: write it as WIDTHxHEIGHT in pixels, e.g. 48x32")
    width, height = int(match.group(1)), int(match.group(2))
    bad = [f"{name} {side}" for name, side in (("width", width), ("height", height)) if side <= 0 or side % multiple]
    if bad:
        raise DataError(f"size {text}: {' and '.join(bad)} must be positive multiples of {multiple} (the patch, "
                        f"times the VAE's factor in latent space); e.g. {width // multiple * multiple or multiple}x"
                        f"{height // multiple * multiple or multiple}")
    return height, width


@dataclass(frozen=True)
class BucketBatch:
    bucket: int  # index into the schedule's buckets
    indices: torch.Tensor  # (global_batch,) long, rows of that bucket


class BucketSchedule:
    """Which bucket and which of its images each step trains on, as a pure function of (seed, step)."""

    def __init__(self, counts: list[int], global_batch: int, seed: int) -> None:
        self.counts, self.global_batch, self.seed = counts, global_batch, seed
        self.batches_per_bucket = [n // global_batch for n in counts]
        self.steps_per_epoch = sum(self.batches_per_bucket)
        if self.steps_per_epoch == 0:
            raise DataError(f"no bucket holds a global batch of {global_batch} images (buckets hold {counts}); "
                            f"lower train.batch_size or import with fewer buckets (a larger --max-aspect step)")
        self._epoch, self._order = -1, torch.empty(0, 2, dtype=torch.long)
        self._perms: list[torch.Tensor] = []

    def _plan(self, epoch: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        self._perms = [torch.randperm(n, generator=generator) for n in self.counts]
        slots = [(b, k) for b, count in enumerate(self.batches_per_bucket) for k in range(count)]
        shuffle = torch.randperm(len(slots), generator=generator)
        self._epoch, self._order = epoch, torch.tensor(slots, dtype=torch.long)[shuffle]

    def at(self, step: int) -> BucketBatch:
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._plan(epoch)
        bucket, k = (int(v) for v in self._order[within])
        start = k * self.global_batch
        return BucketBatch(bucket, self._perms[bucket][start : start + self.global_batch])
