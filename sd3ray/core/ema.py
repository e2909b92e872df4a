"""Exponential moving average of the weights: what samples and evaluation use."""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn


class EMA:
    """`model`: a copy of the trained weights. Under FSDP it is sharded as the trained model is
    (`sd3ray.training.parallel.shard_like`), so each rank averages only its own slices, in place."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """Warm-up: early averages forget fast, so the EMA is not stuck near the random init."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """ema ← ema + (1 − decay)·(θ − ema), as one fused foreach op over this rank's tensors (no host sync, no
        communication: sharded weights and their EMA share one layout)."""
        ema_params = [_local(p) for p in self.model.parameters()]
        params = [_local(p.detach()) for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(step))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a DTensor (a view of its storage); a plain tensor as it is. DTensor's module is not
    imported for the check (most of a second): where nothing imported it, no tensor is one."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return t.to_local() if dtensor is not None and isinstance(t, dtensor.DTensor) else t
