"""What runs on each Ray Train worker: `train_worker` calls the same `train()` as local mode, through `RayContext`,
the run context over Ray Train (rank and world size, DDP or FSDP2, checkpoints reported to Ray storage, the
stop signal).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointUploadMode
from torch import nn

from sd3ray.checkpoint import MANIFEST, CheckpointData, out_of_space, upload_checkpoint, write_checkpoint
from sd3ray.cluster.stop import StopWatcher
from sd3ray.config import Config, from_dict
from sd3ray.data.streaming import Batch
from sd3ray.errors import Sd3rayError
from sd3ray.storage import join, open_folder
from sd3ray.tracking.mlflow_tracker import make_tracker
from sd3ray.tracking.protocol import NullTracker
from sd3ray.training.loop import train
from sd3ray.training.parallel import ParallelPlan, whole_weights, wrap
from sd3ray.training.run_folder import check_owner
from sd3ray.training.signals import Interrupted

Placement = Literal["PACK", "SPREAD"]
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
STOP_AGREE_EVERY = 10  # steps between the ranks' agreement on a relayed signal (sd3ray.cluster.stop)


@dataclass(frozen=True)
class DebugHooks:
    """Fault-tolerance tests' hooks, kept in the Ray context so the loop never sees them."""

    # rank 0 dies without cleanup, as on a lost node, right after reporting this step's checkpoint (first run only)
    kill_after_checkpoint: int = -1
    save_replica_to: str = ""  # each rank's final weights, to prove replicas stay identical
    record_samples_to: str = ""  # streaming: each rank appends the labels of every batch it trains on


class RayContext:
    """RunContext for a Ray Train worker."""

    def __init__(self, run_storage: str, debug: DebugHooks = DebugHooks(), stop_flag: Any = None,
                 run_id: str = "") -> None:
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_storage = run_storage
        self.run_id = run_id
        self.debug = debug
        # a worker cannot tell when the user's command began (a restarted worker or a Tune trial starts long
        # after it), so a time budget counts from the training loop's start
        self.launched_at = None
        self._restored: tempfile.TemporaryDirectory | None = None
        self.run_tags = {"sd3ray.worker_nodes": ",".join(self._node_of_each_rank())}
        self._stop = StopWatcher(stop_flag) if stop_flag is not None else None
        self._stop_checks = 0

    def _node_of_each_rank(self) -> list[str]:
        """Rank r's node address at index r: where the workers landed, recorded with the run."""
        here = ray.util.get_node_ip_address()
        if self.world_size == 1 or not dist.is_initialized():
            return [here]
        nodes: list[str | None] = [None] * self.world_size
        dist.all_gather_object(nodes, here)
        return [str(node) for node in nodes]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def train_stream(self, cfg: Config) -> Callable[[], Iterable[Batch]]:
        from sd3ray.cluster.ray_data import shard_passes

        passes = shard_passes(cfg, self.rank)
        if not self.debug.record_samples_to:
            return passes
        log = Path(self.debug.record_samples_to) / f"rank{self.rank}.txt"
        with log.open("a") as f:
            f.write("start\n")  # a worker (re)started: what follows is one attempt's passes
        return partial(record_samples, passes, log)

    def prepare_model(self, model: nn.Module, plan: ParallelPlan) -> nn.Module:
        return wrap(model, plan, self.device)  # DDP, or FSDP2 over Ray Train's process group

    def _all_reduce(self, value: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        if self.world_size > 1 and dist.is_initialized():
            value = value.clone()
            dist.all_reduce(value, op=op)
        return value

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(value, dist.ReduceOp.SUM) / self.world_size

    def all_reduce_max(self, value: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(value, dist.ReduceOp.MAX)

    def stop_signal(self) -> int | None:
        """The signal the driver relayed. One worker reads its own flag; several agree on the largest one seen, so
        all stop at one step, with a collective every STOP_AGREE_EVERY steps only (it syncs the host)."""
        if self._stop is None:
            return None  # a Tune trial: Tune stops it
        if self.world_size == 1:
            return self._stop.requested
        self._stop_checks += 1  # every rank calls this once a step, so the counts agree
        if self._stop_checks % STOP_AGREE_EVERY:
            return None
        seen = torch.tensor([self._stop.requested or 0], device=self.device)
        return int(self.all_reduce_max(seen).item()) or None

    def resume_from(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="sd3ray-restore-")
        restored = Path(checkpoint.to_directory(self._restored.name))
        check_owner(restored, self.run_id, self.run_storage)
        return restored

    def save_and_report(self, data: CheckpointData | None, metrics: dict[str, Any]) -> str | None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}  # the run id is a str
        if data is None:
            ray.train.report(scalars)
            return None
        if data.sharded:
            return self._save_sharded(data, scalars)
        tmp = Path(tempfile.mkdtemp(prefix="sd3ray-ckpt-"))
        try:
            name = f"step_{data.step:08d}"
            try:
                write_checkpoint(tmp / name, data)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise out_of_space(exc, tmp, data.step, "the checkpoints already in storage are intact") from exc
            ray.train.report(scalars, checkpoint=Checkpoint.from_directory(str(tmp / name)), checkpoint_dir_name=name,
                             checkpoint_upload_fn=self._upload)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if data.step == self.debug.kill_after_checkpoint and self._restored is None:
            die_like_a_lost_node(data.step)
        return f"{self.run_storage}/{name}"


    def _save_sharded(self, data: CheckpointData, scalars: dict[str, Any]) -> str:
        """Every rank writes its shards into a folder of its own and uploads them into the step's folder in storage;
        once all have, rank 0 uploads the manifest that makes the folder a checkpoint, and every rank reports that
        one folder (Train V2 registers a checkpoint when all ranks reported the same path)."""
        name = f"step_{data.step:08d}"
        destination = join(self.run_storage, name)
        tmp = Path(tempfile.mkdtemp(prefix="sd3ray-ckpt-"))
        try:
            try:
                local = write_checkpoint(tmp / name, data)  # a collective: rank 0 gathers every rank's checksums
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise out_of_space(exc, tmp, data.step, "the checkpoints already in storage are intact") from exc
            shards = [p.name for p in local.iterdir() if p.is_file() and p.name != MANIFEST]
            upload_checkpoint(local, destination, names=shards)
            dist.barrier()  # every rank's shards are in storage before the manifest names them
            if self.is_main:
                upload_checkpoint(local, destination, names=[MANIFEST])
            fs, path = open_folder(destination)
            ray.train.report(scalars, checkpoint=Checkpoint(path=path, filesystem=fs), checkpoint_dir_name=name,
                             checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if data.step == self.debug.kill_after_checkpoint and self._restored is None and self.is_main:
            die_like_a_lost_node(data.step)
        return f"{self.run_storage}/{name}"

    def _upload(self, checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
        """Ray's own upload gives up at the first failure; this one retries transient ones (upload_checkpoint)."""
        destination = join(self.run_storage, dir_name)
        upload_checkpoint(Path(checkpoint.path), destination)
        fs, path = open_folder(destination)
        return Checkpoint(path=path, filesystem=fs)


def die_like_a_lost_node(step: int) -> None:
    """DebugHooks.kill_after_checkpoint: end this worker process at once, without cleanup."""
    print(f"sd3ray: killing rank 0 after the step-{step} checkpoint (debug hook)", flush=True)
    # Ray Train's controller registers a reported checkpoint when it next polls the workers (every 2 s by default,
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). A worker that dies sooner restarts from an older checkpoint, which is
    # correct but would not test a restart from the newest one.
    time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1)
    os._exit(1)


REPORT_LOG_MODULE = "ray.train.v2._internal.execution.context"


def quiet_report_lines() -> None:
    """Ray Train logs every report with its full metrics at INFO, from a logger named by its file path, so the
    `ray.train` level sd3ray sets (`LoggingConfig`) misses it; this worker's copy of it goes to WARNING. Where a Ray
    version has no such logger, nothing changes."""
    logger = getattr(sys.modules.get(REPORT_LOG_MODULE), "logger", None)
    if isinstance(logger, logging.Logger):
        logger.setLevel(logging.WARNING)


def train_worker(config: dict[str, Any]) -> None:
    """Per-worker entry point: rebuild the Config, then run the shared loop."""
    quiet_report_lines()
    cfg = from_dict(config["cfg"])
    debug = DebugHooks(**config.get("debug", {}))
    ctx = RayContext(config["run_storage"], debug, config.get("stop_flag"), config.get("run_id", ""))
    ctx.run_tags.update(config.get("source_tags", {}))
    tracking = config["tracking"] and ctx.is_main
    tracker = make_tracker(cfg, enabled=True, uri=config["tracking_uri"]) if tracking else NullTracker()
    try:
        result = train(cfg, ctx, tracker)
    except Interrupted:
        return  # stopped on the driver's signal, checkpoint reported: a clean end, not a failure to retry
    except Sd3rayError as exc:
        # An explained error needs no stack: Ray logs what the worker raised, and the driver prints the message.
        raise exc.with_traceback(None) from None
    if debug.save_replica_to:
        torch.save(whole_weights(result.model), Path(debug.save_replica_to) / f"rank{ctx.rank}.pt")


def record_samples(passes: Callable[[], Iterable[Batch]], log: Path) -> Iterator[Batch]:
    """One pass, logged to `log`: a `pass` line, then the labels of each batch on a line of their own."""
    with log.open("a") as f:
        f.write("pass\n")
    for batch in passes():
        with log.open("a") as f:
            f.write(" ".join(map(str, batch["label"].tolist())) + "\n")
        yield batch
