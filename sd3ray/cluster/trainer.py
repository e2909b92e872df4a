"""Ray Train: the same `train()` on N workers (Train V2 `TorchTrainer`), DDP or FSDP2 through the run context's
`prepare_model` (sd3ray.training.parallel).

Checkpoints are reported to Ray and land in `storage_path/name/step_XXXXXXXX`; re-running with the same name and
storage path resumes from the newest one (Train V2 restores it into `ray.train.get_checkpoint()`), and so does a
restart after a worker failure (`FailureConfig.max_failures`). Only rank 0 logs to MLflow and draws grids; every
rank reports the same number of times.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from sd3ray.cluster.connect import OwnCluster, connect, lean_for_own_cluster
from sd3ray.cluster.stop import relayed_stop
from sd3ray.cluster.worker import PRINT_PATCH_ENV, DebugHooks, Placement, train_worker
from sd3ray.config import Config, to_dict
from sd3ray.data.prepare import prepare_dataset
from sd3ray.data.streaming import streams
from sd3ray.errors import ResourceError, StorageError
from sd3ray.storage import check_shared, is_uri, join, redact, resolve_tracking_uri, writable_folder
from sd3ray.tracking.mlflow_tracker import check_reachable, review_hint, source_tags
from sd3ray.training.run_folder import claim, finish
from sd3ray.training.run_lock import run_lock
from sd3ray.training.signals import Interrupted, signal_name


def absolute_paths(cfg: Config) -> Config:
    """Workers run in other directories: hand them absolute data and output paths (URIs as they are), and the
    pretrained folders (VAE, text encoders, base transformer, guide) absolute where they exist here; hub ids stay
    ids. The output folder holds the spool of tracking writes a server did not take, which the replay job reads
    where the command was typed, not in a worker's Ray folder."""
    def absolute(location: str) -> str:
        return location if is_uri(location) else str(Path(location).resolve())

    def local_folder(value: str) -> str:
        here = bool(value) and not is_uri(value) and Path(value).expanduser().exists()
        return str(Path(value).expanduser().resolve()) if here else value

    return replace(cfg, data=replace(cfg.data, parquet_dir=absolute(cfg.data.parquet_dir),
                                     raw_root=absolute(cfg.data.raw_root)),
                   train=replace(cfg.train, output_dir=absolute(cfg.train.output_dir)),
                   model=replace(cfg.model, init_from=local_folder(cfg.model.init_from)),
                   vae=replace(cfg.vae, source=local_folder(cfg.vae.source)),
                   text=replace(cfg.text, encoder=tuple(local_folder(e) for e in cfg.text.encoder)),
                   sample=replace(cfg.sample, guide=local_folder(cfg.sample.guide)))


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


class Sd3rayTrainer(TorchTrainer):
    """A TorchTrainer that leaves SIGINT to sd3ray, and starts no dataset manager for a run without Ray Datasets.
    Ray Train's own SIGINT handler aborts the workers at once, losing the work since the last checkpoint; sd3ray's
    (`sd3ray.cluster.stop`) stops them after a step and a checkpoint. `_register_sigint_handler` is Ray's private
    hook; where a Ray version lacks it, Ray's handler runs as before."""

    def _register_sigint_handler(self, controller: Any) -> None:
        return None

    def _create_default_callbacks(self) -> list:
        """Ray Train starts a DatasetManager actor for every run, with datasets or without: one more process that
        imports Ray Data (~3.5 CPU s each time, measured) and that nothing asks for a shard when the workers read
        their own Parquet files. Only a run given Ray Datasets (the streaming reader) keeps it. A private hook, as
        above; where a Ray version lacks it, the manager starts as before."""
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [cb for cb in callbacks if type(cb).__name__ != "DatasetsCallback"]


class OwnClusterTrainer(Sd3rayTrainer):
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
                  placement: Placement = "PACK", stop_flag: Any = None, run_id: str = "") -> TorchTrainer:
    """A TorchTrainer for `cfg` whose checkpoints go to storage_path/name. `placement` SPREAD puts workers on as
    many nodes as it can (one per node where there are enough); PACK, Ray's default, fills a node first.
    `stop_flag` relays the driver's signals to the workers (sd3ray.cluster.stop); `run_id` is the run that owns
    storage_path/name (sd3ray.training.run_folder), recorded in its checkpoints."""
    cfg = absolute_paths(cfg)
    storage = storage_path or default_storage(cfg)
    # Train V2 hands each worker's print() to a logger that writes to stderr and, because Ray wraps the worker's
    # stdout, to stdout as well: every line reached the console twice. Ray propagates this from the driver.
    os.environ.setdefault(PRINT_PATCH_ENV, "0")
    uri = resolve_tracking_uri(cfg.tracking.uri)
    loop_config = {"cfg": to_dict(cfg), "tracking": tracking, "tracking_uri": uri,
                   "run_storage": join(storage, name), "debug": asdict(debug or DebugHooks()),
                   "source_tags": source_tags(),  # the driver's job, not the worker's Ray entry point
                   "stop_flag": stop_flag, "run_id": run_id}
    datasets = None
    if streams(cfg):  # Ray Data reads and decodes; Ray Train splits the stream over the workers
        from sd3ray.cluster.ray_data import TRAIN_DATASET, train_dataset

        datasets = {TRAIN_DATASET: train_dataset(cfg)}
    trainer_cls: type[TorchTrainer] = Sd3rayTrainer
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
            name=name, storage_path=storage, callbacks=callbacks, **quiet_train_logs(),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )


def quiet_train_logs() -> dict[str, Any]:
    """Ray Train's console shows its errors only. Its INFO lines (resource requests, the worker group, every
    report's metrics) and its warnings are for Ray's log files, where they stay (`logs/train/ray-train-sys-*` in the
    Ray session folder): under load the controller warns, with a traceback, each time a resource request to the
    autoscaler times out, which a run that already holds its workers can ignore, and sd3ray's own lines say what
    happens. `LoggingConfig` is Ray Train's public API; a Ray version without it keeps its console as it was."""
    logging_config = getattr(ray.train, "LoggingConfig", None)
    return {"logging_config": logging_config(log_level="ERROR")} if logging_config else {}


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
    writable_folder(Path(storage), "--storage-path", "give a folder every node can write, or a URI such as "
                    "s3://bucket/path")


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
            placement: Placement = "PACK", resume: bool = False) -> ray.train.Result:
    """Run checks and prepare data on the driver, then fit. `resume`: continue or extend the run folder's run
    (`--resume latest`); without it a folder whose run finished is refused (sd3ray.training.run_folder)."""
    storage = storage_path or default_storage(cfg)
    connect()
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    shared = {"--storage-path": storage, "data.parquet_dir (--parquet-dir)": cfg.data.parquet_dir}
    check_shared({**shared, "tracking.uri": resolve_tracking_uri(cfg.tracking.uri)} if tracking else shared, nodes)
    if tracking:
        check_reachable(resolve_tracking_uri(cfg.tracking.uri))
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    check_storage(storage)  # after check_shared: a folder every node cannot see is refused before it is made
    run_storage = join(storage, name)
    run = claim(run_storage, name, resume, cfg.train.steps, checkpoints_at=run_storage)  # before any data work
    prepare_dataset(cfg)  # once, here: the workers only read it
    # a streaming run's reading tasks need a CPU the training workers leave free, or the stream never starts
    reserve = STREAM_CPUS if streams(cfg) else 0
    cpus_per_worker = cpus_per_worker or default_cpus_per_worker(workers, use_gpu, reserve)
    check_resources(workers, use_gpu, cpus_per_worker, reserve)
    print(redact(f"sd3ray: Ray Train run '{name}': {workers} {'GPU' if use_gpu else 'CPU'} worker(s) × "
                 f"{cpus_per_worker} CPU on {nodes} "
                 f"node(s) ({placement.lower()}), global batch {cfg.train.batch_size * workers}; "
                 f"checkpoints -> {join(storage, name)}; "
                 f"MLflow -> {resolve_tracking_uri(cfg.tracking.uri) if tracking else 'off'}"), flush=True)
    # one driver per run name: a folder takes an OS lock; object storage has none to take (docs/distributed.md)
    with contextlib.nullcontext() if is_uri(storage) else run_lock(Path(storage) / name), \
            relayed_stop() as (stop, flag):
        if run.line:
            print(f"sd3ray: {run.line}", flush=True)
        result = build_trainer(cfg, name, workers, use_gpu, storage_path, max_failures, tracking,
                               cpus_per_worker=cpus_per_worker, placement=placement, stop_flag=flag,
                               run_id=run.record.run_id).fit()
        metrics = result.metrics or {}
        if stop.requested is None and result.error is None:
            finish(run_storage, run.record, int(metrics.get("step", 0)))
    final = join(join(storage, name), Path(result.checkpoint.path).name) if result.checkpoint else None
    if stop.requested is not None:
        kept = f"its newest checkpoint is {final}; run the same command again to continue from it" if final \
            else "nothing was saved yet"
        raise Interrupted(redact(f"{signal_name(stop.requested)}: stopped at step {metrics.get('step')} and "
                                 f"{kept}"), stop.requested)
    print(redact(f"sd3ray: done at step {metrics.get('step')}; loss/val {metrics.get('loss/val')}; checkpoint "
                 f"{final}; MLflow run {metrics.get('mlflow_run_id')}"), flush=True)
    if tracking and metrics.get("mlflow_run_id"):
        print(review_hint(cfg.tracking.uri, metrics["mlflow_run_id"]), flush=True)
    return result
