"""Where the training loop runs: rank, world size, device, model wrapping, collectives and checkpoint reporting.

`train()` talks only to this protocol, so the same loop runs in one local process and on every Ray Train worker
(`sd3ray.cluster.worker.RayContext`) without importing ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from sd3ray.checkpoint import CheckpointData, CheckpointError, latest_checkpoint, save_checkpoint
from sd3ray.config import Config

if TYPE_CHECKING:
    from sd3ray.data.streaming import Batch
    from sd3ray.training.parallel import ParallelPlan
    from sd3ray.training.signals import StopRequest


class RunContext(Protocol):
    rank: int
    world_size: int
    device: torch.device
    run_tags: dict[str, str]  # facts about where the run executes, recorded with it (e.g. its workers' nodes)
    run_id: str  # the run that owns the run folder (sd3ray.training.run_folder), recorded in each checkpoint
    # time.monotonic() when the user's command started, where this process knows it (local mode): a time budget
    # then counts start-up too. None: the budget counts from the training loop's start.
    launched_at: float | None

    @property
    def is_main(self) -> bool: ...

    def prepare_model(self, model: nn.Module, plan: ParallelPlan) -> nn.Module:
        """What the step calls: `model` as `plan` spreads it over the workers (`sd3ray.training.parallel.wrap`:
        DDP, or FSDP2 sharding it in place; activation checkpointing either way)."""

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor: ...

    def stop_signal(self) -> int | None:
        """The signal that asked this run to stop after the current step (local mode), else None."""

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor: ...

    def resume_from(self) -> Path | None:
        """The checkpoint directory to resume from, if any."""

    def train_stream(self, cfg: Config) -> Callable[[], Iterable[Batch]]:
        """Streaming runs: each call starts a fresh pass over this rank's share of the training split, in exact
        batches of `train.batch_size` (see `sd3ray.data.streaming`)."""

    def save_and_report(self, data: CheckpointData | None, metrics: dict[str, Any]) -> str | None:
        """Persist a checkpoint (rank 0 passes it, others None; a sharded one every rank, its own shards) and report
        metrics; every rank calls this the same number of times. Returns where the checkpoint lives (a path or
        URI), if one was saved."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def process_launched_at() -> float:
    """This process's start on the time.monotonic() clock: imports and data loading happen after it."""
    import psutil

    return time.monotonic() - max(0.0, time.time() - psutil.Process().create_time())


class LocalContext:
    """One process: checkpoints go to `run_dir/checkpoints`, written atomically, the newest `keep` kept."""

    rank = 0
    world_size = 1
    run_tags: dict[str, str] = {}

    def __init__(self, run_dir: Path, device: torch.device | None = None, resume: Path | None = None,
                 keep: int = 3, launched_at: float | None = None, stop: StopRequest | None = None,
                 run_id: str = "") -> None:
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.stop = stop
        self.device = device or default_device()
        self._resume = resume
        self.keep = keep
        self.launched_at = launched_at

    @property
    def is_main(self) -> bool:
        return True

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def prepare_model(self, model: nn.Module, plan: ParallelPlan) -> nn.Module:
        from sd3ray.training.parallel import wrap

        return wrap(model, plan, self.device)

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def stop_signal(self) -> int | None:
        return self.stop.requested if self.stop is not None else None

    def resume_from(self) -> Path | None:
        return self._resume

    def train_stream(self, cfg: Config) -> Callable[[], Iterable[Batch]]:
        from sd3ray.data.streaming import LocalParquetStream

        return LocalParquetStream(cfg.data.parquet_dir, cfg.train.batch_size, cfg.train.seed,
                                  cfg.data.shuffle_buffer).__iter__

    def save_and_report(self, data: CheckpointData | None, metrics: dict[str, Any]) -> str | None:
        if data is None:
            return None
        return str(save_checkpoint(self.checkpoint_root, data, keep=self.keep))


def resolve_run_dir(spec: str | None, output_dir: Path, name: str | None, default_name: str) -> Path:
    """The run folder a local command writes: the one `--resume PATH` came from, `output_dir/name`, or with
    `--resume latest` and no name the most recently written run under output_dir that has a checkpoint."""
    if spec is not None and spec != "latest":
        return Path(spec).parent.parent  # a resumed run keeps writing next to the checkpoint it came from
    if name or spec is None:
        return output_dir / (name or default_name)
    runs = sorted((p for p in output_dir.glob("*") if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for run in runs:
        if latest_checkpoint(run / "checkpoints") is not None:
            return run
    raise CheckpointError(f"--resume latest: no complete checkpoint under {output_dir}/*/checkpoints")
