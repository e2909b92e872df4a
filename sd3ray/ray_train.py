"""Ray Train: the same `train()` on N workers (Train V2 `TorchTrainer`), DDP through `prepare_model`.

Checkpoints are reported to Ray and land in `storage_path/name/step_XXXXXXXX`; re-running with the same name and
storage path resumes from the newest one (Train V2 restores it into `ray.train.get_checkpoint()`), and so does a
restart after a worker failure (`FailureConfig.max_failures`). Only rank 0 logs to MLflow and draws grids; every
rank reports the same number of times.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from sd3ray.checkpoint import CheckpointData, out_of_space, upload_checkpoint, write_checkpoint
from sd3ray.config import Config, from_dict, to_dict
from sd3ray.data import open_folder, prepare_dataset
from sd3ray.errors import ResourceError, Sd3rayError, StorageError
from sd3ray.redact import redact
from sd3ray.run_lock import run_lock
from sd3ray.shared_storage import check_shared, is_uri, join
from sd3ray.streaming import Batch, describe_choice, streams
from sd3ray.tracking import NullTracker, check_reachable, make_tracker, resolve_tracking_uri, source_tags
from sd3ray.train_loop import train

Placement = Literal["PACK", "SPREAD"]
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"


@dataclass(frozen=True)
class DebugHooks:
    """Fault-tolerance tests' hooks, kept in the Ray context so the loop never sees them."""

    # rank 0 dies without cleanup, as on a lost node, right after reporting this step's checkpoint (first run only)
    kill_after_checkpoint: int = -1
    save_replica_to: str = ""  # each rank's final weights, to prove replicas stay identical
    record_samples_to: str = ""  # streaming: each rank appends the labels of every batch it trains on


class RayContext:
    """RunContext for a Ray Train worker."""

    def __init__(self, run_storage: str, debug: DebugHooks = DebugHooks()) -> None:
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_storage = run_storage
        self.debug = debug
        # a worker cannot tell when the user's command began (a restarted worker or a Tune trial starts long
        # after it), so a time budget counts from the training loop's start
        self.launched_at = None
        self._restored: tempfile.TemporaryDirectory | None = None
        self.run_tags = {"sd3ray.worker_nodes": ",".join(self._node_of_each_rank())}

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
        from sd3ray.ray_data import shard_passes

        passes = shard_passes(cfg, self.rank)
        if not self.debug.record_samples_to:
            return passes
        log = Path(self.debug.record_samples_to) / f"rank{self.rank}.txt"
        with log.open("a") as f:
            f.write("start\n")  # a worker (re)started: what follows is one attempt's passes
        return partial(record_samples, passes, log)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=False)  # DDP when world_size > 1

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
        return None  # a worker is stopped by Ray Train; the driver's signals are Ray's to handle

    def resume_from(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="sd3ray-restore-")
        return Path(checkpoint.to_directory(self._restored.name))

    def save_and_report(self, data: CheckpointData | None, metrics: dict[str, Any]) -> str | None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if data is None:
            ray.train.report(scalars)
            return None
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


def train_worker(config: dict[str, Any]) -> None:
    """Per-worker entry point: rebuild the Config, then run the shared loop."""
    cfg = from_dict(config["cfg"])
    debug = DebugHooks(**config.get("debug", {}))
    ctx = RayContext(config["run_storage"], debug)
    ctx.run_tags.update(config.get("source_tags", {}))
    tracking = config["tracking"] and ctx.is_main
    tracker = make_tracker(cfg, enabled=True, uri=config["tracking_uri"]) if tracking else NullTracker()
    try:
        result = train(cfg, ctx, tracker)
    except Sd3rayError as exc:
        # An explained error needs no stack: Ray logs what the worker raised, and the driver prints the message.
        raise exc.with_traceback(None) from None
    if debug.save_replica_to:
        torch.save(result.model.state_dict(), Path(debug.save_replica_to) / f"rank{ctx.rank}.pt")


def record_samples(passes: Callable[[], Iterable[Batch]], log: Path) -> Iterator[Batch]:
    """One pass, logged to `log`: a `pass` line, then the labels of each batch on a line of their own."""
    with log.open("a") as f:
        f.write("pass\n")
    for batch in passes():
        with log.open("a") as f:
            f.write(" ".join(map(str, batch["label"].tolist())) + "\n")
        yield batch


def _absolute_paths(cfg: Config) -> Config:
    """Workers run in other directories: hand them absolute data paths (URIs as they are)."""
    def absolute(location: str) -> str:
        return location if is_uri(location) else str(Path(location).resolve())

    return replace(cfg, data=replace(cfg.data, parquet_dir=absolute(cfg.data.parquet_dir),
                                     raw_root=absolute(cfg.data.raw_root)))


def default_storage(cfg: Config) -> str:
    return str(Path(cfg.train.output_dir).resolve() / "ray")


STREAM_CPUS = 1  # CPUs a streaming run keeps for Ray Data's read and decode tasks


def check_resources(workers: int, use_gpu: bool, cpus_per_worker: int = 1, reserve: int = 0) -> None:
    """Fail fast instead of waiting forever for resources a fixed-size cluster will never have."""
    total = ray.cluster_resources()
    for key, need in (("GPU", workers if use_gpu else 0), ("CPU", (0 if use_gpu else workers * cpus_per_worker)
                                                                  + reserve)):
        have = total.get(key, 0)
        if have < need:
            extra = f" (with {reserve} kept for streaming the data)" if reserve and key == "CPU" else ""
            held = ", ".join(f"{k}={v:g}" for k, v in total.items() if k in ("CPU", "GPU"))
            raise ResourceError(f"--workers {workers} needs {need} {key}(s){extra} but the Ray cluster has "
                                f"{have:g} ({held}). Lower --workers or --cpus-per-worker, use --cpu, or add nodes.")


class OwnClusterTrainer(TorchTrainer):
    """A TorchTrainer without Ray Train's placement-group cleaner, for the cluster this driver started.

    The cleaner is a detached actor that polls the State API every second, to remove the run's placement group if
    the controller dies. On a cluster that ends with its driver there is nothing left to clean, and on the lean
    local cluster (no dashboard, so no State API) every poll fails and prints a warning: hundreds of console lines
    in a few minutes. `_create_default_callbacks` is Ray's private hook; where a Ray version lacks it, this class
    is a plain TorchTrainer and the cleaner runs as before."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        return [cb for cb in callbacks if type(cb).__name__ != "PlacementGroupCleanerCallback"]


def build_trainer(cfg: Config, name: str, workers: int = 1, use_gpu: bool = False, storage_path: str | None = None,
                  max_failures: int = 0, tracking: bool = True, callbacks: list | None = None,
                  debug: DebugHooks | None = None, cpus_per_worker: float = 1,
                  placement: Placement = "PACK") -> TorchTrainer:
    """A TorchTrainer for `cfg` whose checkpoints go to storage_path/name. `placement` SPREAD puts workers on as
    many nodes as it can (one per node where there are enough); PACK, Ray's default, fills a node first."""
    cfg = _absolute_paths(cfg)
    storage = storage_path or default_storage(cfg)
    # Train V2 hands each worker's print() to a logger that writes to stderr and, because Ray wraps the worker's
    # stdout, to stdout as well: every line reached the console twice. Ray propagates this from the driver.
    os.environ.setdefault(PRINT_PATCH_ENV, "0")
    uri = resolve_tracking_uri(cfg.tracking.uri)
    loop_config = {"cfg": to_dict(cfg), "tracking": tracking, "tracking_uri": uri,
                   "run_storage": join(storage, name), "debug": asdict(debug or DebugHooks()),
                   "source_tags": source_tags()}  # the driver's job, not the worker's Ray entry point
    datasets = None
    if streams(cfg):  # Ray Data reads and decodes; Ray Train splits the stream over the workers
        from sd3ray.ray_data import TRAIN_DATASET, train_dataset

        datasets = {TRAIN_DATASET: train_dataset(cfg)}
    trainer_cls = TorchTrainer
    if OwnCluster.started:
        lean_for_own_cluster()
        trainer_cls = OwnClusterTrainer
    return trainer_cls(
        train_worker,
        train_loop_config=loop_config,
        datasets=datasets,
        # Ray sizes each worker's thread pool (OMP_NUM_THREADS) to its CPUs
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, placement_strategy=placement,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=name, storage_path=storage, callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )


def check_storage(storage: str) -> None:
    """A local storage path must be creatable and writable; a URI must name a filesystem pyarrow can open."""
    if "://" in storage:
        import pyarrow.fs

        try:
            pyarrow.fs.FileSystem.from_uri(storage)
        except Exception as exc:
            raise StorageError(f"--storage-path {storage} cannot be opened ({exc}); use a local folder, NFS "
                               f"mount, or a URI such as s3://bucket/path with credentials set") from exc
        return
    try:
        Path(storage).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=storage):
            pass
    except OSError as exc:
        raise StorageError(f"--storage-path {storage} is not a writable folder ({exc})") from exc


class ClusterUnreachable(Sd3rayError):
    """The Ray cluster sd3ray was told (or found) to join does not answer."""


def cluster_address() -> tuple[str | None, str]:
    """The cluster `ray.init()` would join and where that address comes from: $RAY_ADDRESS, else the address file
    that the last `ray start --head` on this machine wrote; (None, "") when Ray will start a local cluster."""
    from ray._common.utils import get_ray_address_file

    if address := os.environ.get("RAY_ADDRESS", "").strip():
        return address, "the RAY_ADDRESS environment variable"
    address_file = Path(get_ray_address_file(None))
    if address_file.is_file() and (address := address_file.read_text().strip()):
        return address, f"{address_file}, written by the last `ray start --head` on this machine"
    return None, ""


def gcs_answers(address: str, timeout_s: float) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


DASHBOARD_ENV = "SD3RAY_RAY_DASHBOARD"


# Ray starts its workers at nice 15 (worker_niceness), so on a busy machine a Train worker loses every CPU
# contest with the driver and Ray's own daemons. On the cluster sd3ray starts for one run, the worker is the run.
WORKER_NICENESS = 0
# Ray Train's preemption watcher polls for node drain notices that a single machine never receives.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def local_cluster_options() -> dict[str, Any]:
    """How sd3ray starts the one-machine cluster a run without a cluster gets: workers at nice 0, no dashboard and
    no metrics export unless SD3RAY_RAY_DASHBOARD=1. On a small machine those daemons take CPU from the training
    step (docs/performance.md: Ray Train against local mode); a run on one machine has the console and MLflow to
    watch instead."""
    system = {"worker_niceness": WORKER_NICENESS}
    if os.environ.get(DASHBOARD_ENV, "") not in ("", "0"):
        return {"include_dashboard": True, "_system_config": system}
    return {"include_dashboard": False, "_system_config": {**system, "enable_metrics_collection": False}}


class OwnCluster:
    """Whether this driver started the cluster it runs on (and so ends it when it exits)."""

    started = False


def lean_for_own_cluster() -> None:
    """On a cluster this driver started, the Train controller needs no preemption watcher (a single machine gets
    no drain notices); the placement-group cleaner is left out by `own_cluster_trainer`."""
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")  # Ray propagates it from the driver to the controller


def connect(timeout_s: float = 10.0) -> None:
    """Join $RAY_ADDRESS / the cluster a `ray job submit` runs on / the one `ray start` left, or start a local one.

    Ray itself retries a dead address for as long as it takes (minutes, forever for a stale address file); a
    cluster that does not answer within `timeout_s` ends here instead, with what to do about it.
    """
    if ray.is_initialized():
        return
    address, source = cluster_address()
    if address and ":" in address and not address.startswith(("ray://", "local", "auto")) \
            and not gcs_answers(address, timeout_s):
        stale_file = "" if source.startswith("the RAY_ADDRESS") else f" (or delete {source.split(',')[0]})"
        raise ClusterUnreachable(
            f"the Ray cluster at {address} (from {source}) does not answer within {timeout_s:g} s. Start it again, "
            f"point RAY_ADDRESS at a live cluster, or run on a fresh local cluster: unset RAY_ADDRESS{stale_file}.")
    try:
        ray.init(address=address, **({} if address else local_cluster_options()))
        OwnCluster.started = address is None
    except ConnectionError as exc:
        raise ClusterUnreachable(f"cannot join the Ray cluster at {address} (from {source}): {exc}") from exc


def cluster_gpus() -> float:
    """GPUs in the cluster sd3ray joins (connecting first)."""
    connect()
    return ray.cluster_resources().get("GPU", 0)


def default_cpus_per_worker(workers: int, use_gpu: bool, reserve: int = 0) -> int:
    """CPU workers share the cluster's CPUs (one worker on a 2-core machine gets both, and torch as many threads),
    less `reserve` kept for Ray Data's reading tasks, no more than the largest node has; a GPU worker needs one to
    feed its GPU."""
    if use_gpu:
        return 1
    per_node = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]]
    free = ray.cluster_resources().get("CPU", 1) - reserve
    return max(1, int(min(free // workers, max(per_node, default=1))))


def run_ray(cfg: Config, name: str, workers: int = 1, use_gpu: bool | None = None, storage_path: str | None = None,
            max_failures: int = 0, tracking: bool = True, cpus_per_worker: int | None = None,
            placement: Placement = "PACK") -> ray.train.Result:
    """Run checks and prepare data on the driver, then fit."""
    storage = storage_path or default_storage(cfg)
    connect()
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    shared = {"--storage-path": storage, "data.parquet_dir (--parquet-dir)": cfg.data.parquet_dir}
    check_shared({**shared, "tracking.uri": resolve_tracking_uri(cfg.tracking.uri)} if tracking else shared, nodes)
    if tracking:
        check_reachable(resolve_tracking_uri(cfg.tracking.uri))
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    check_storage(storage)
    prepare_dataset(cfg)  # once, here: the workers only read it
    print(describe_choice(cfg), flush=True)
    # a streaming run's reading tasks need a CPU the training workers leave free, or the stream never starts
    reserve = STREAM_CPUS if streams(cfg) else 0
    cpus_per_worker = cpus_per_worker or default_cpus_per_worker(workers, use_gpu, reserve)
    check_resources(workers, use_gpu, cpus_per_worker, reserve)
    trainer = build_trainer(cfg, name, workers, use_gpu, storage_path, max_failures, tracking,
                            cpus_per_worker=cpus_per_worker, placement=placement)
    print(redact(f"sd3ray: Ray Train run '{name}': {workers} {'GPU' if use_gpu else 'CPU'} worker(s) × "
                 f"{cpus_per_worker} CPU on {nodes} "
                 f"node(s) ({placement.lower()}), global batch {cfg.train.batch_size * workers}; "
                 f"checkpoints -> {join(storage, name)}; "
                 f"MLflow -> {resolve_tracking_uri(cfg.tracking.uri) if tracking else 'off'}"), flush=True)
    # one driver per run name: a folder takes an OS lock; object storage has none to take (docs/distributed.md)
    with contextlib.nullcontext() if is_uri(storage) else run_lock(Path(storage) / name):
        result = trainer.fit()
    metrics = result.metrics or {}
    final = join(join(storage, name), Path(result.checkpoint.path).name) if result.checkpoint else None
    print(redact(f"sd3ray: done at step {metrics.get('step')}; val/loss {metrics.get('val/loss')}; checkpoint "
                 f"{final}"), flush=True)
    return result
