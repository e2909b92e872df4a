"""Experiment tracking. `train()` logs through the Tracker protocol; only `MlflowTracker` imports mlflow, and only
rank 0 holds one (other ranks get a NullTracker)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Protocol

import numpy as np

from sd3ray.config import Config, config_hash, flatten, to_yaml

DEFAULT_URI = "sqlite:///mlflow.db"
PROGRESS_METRIC = "train/loss"  # its last logged step marks how far a resumed run had logged


class TrackingError(RuntimeError):
    """The tracking backend cannot be reached or refused a request."""


class Tracker(Protocol):
    run_id: str | None

    def start(self, cfg: Config, run_id: str | None = None, tags: dict[str, str] | None = None) -> str | None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, key: str, image: np.ndarray, step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Logs nothing: for non-zero ranks and for runs without tracking."""

    def __init__(self) -> None:
        self.run_id: str | None = None

    def start(self, cfg: Config, run_id: str | None = None, tags: dict[str, str] | None = None) -> str | None:
        self.run_id = run_id
        return run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, key: str, image: np.ndarray, step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


def resolve_tracking_uri(configured: str = "") -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else ./mlflow.db. Relative SQLite paths become absolute so Ray
    workers (which run in another directory) write to the same database as the driver."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast with advice instead of letting the client retry for minutes against a dead server."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)
    except Exception as exc:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({exc}). Start it (mlflow server "
                            f"--backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000) or unset "
                            f"MLFLOW_TRACKING_URI to log to ./mlflow.db") from exc


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MlflowTracker:
    """One MLflow run per training run; a resumed run continues the same run without duplicating steps."""

    def __init__(self, uri: str, experiment: str, run_name: str = "") -> None:
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.run_id: str | None = None
        self._logged_through = -1  # metrics at or below this step were logged before a resume

    def start(self, cfg: Config, run_id: str | None = None, tags: dict[str, str] | None = None) -> str | None:
        check_reachable(self.uri)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, PROGRESS_METRIC)
            self._logged_through = max((m.step for m in history), default=-1)
            return run_id
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.experiment)
        all_tags = {"sd3ray.config_hash": config_hash(cfg), "mlflow.source.git.commit": git_commit(), **(tags or {})}
        if cfg.tracking.parent_run_id:
            all_tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        run = self.client.create_run(experiment_id, run_name=self.run_name or None, tags=all_tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, to_yaml(cfg), "config.yaml")
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self._logged_through:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        if step > self._logged_through:
            self.client.log_image(self.run_id, image, key=key, step=step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)


def make_tracker(cfg: Config, enabled: bool = True, uri: str | None = None) -> Tracker:
    if not enabled:
        return NullTracker()
    return MlflowTracker(uri or resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment, cfg.tracking.run_name)


def log_evaluation(cfg: Config, checkpoint: str, uri: str, step: int, rows: list[dict[str, float]],
                   plot: np.ndarray, files: Path) -> str:
    """Log an evaluation grid as a new run nested under the checkpoint's training run (when known), so the UI
    shows it beside that run without touching the training run's own metrics or status."""
    meta_path = Path(checkpoint) / "meta.json"
    source = json.loads(meta_path.read_text()).get("mlflow_run_id") if meta_path.is_file() else checkpoint
    tags = {"sd3ray.evaluated_checkpoint": str(checkpoint), "sd3ray.evaluated_step": str(step)}
    tracker = MlflowTracker(resolve_tracking_uri(uri or cfg.tracking.uri), cfg.tracking.experiment,
                            f"evaluate-step{step}")
    check_reachable(tracker.uri)
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        if source:
            client = MlflowClient(tracker.uri)
            parent = client.get_run(source)
            tags["mlflow.parentRunId"] = source
            tracker.experiment = client.get_experiment(parent.info.experiment_id).name  # nest in the same place
    except MlflowException:
        pass  # the training run lives in another tracking store: log a standalone run
    tracker.start(cfg, None, tags=tags)
    for row in rows:
        prefix = f"eval/g{row['guidance']:g}_s{row['steps']}"
        tracker.log_metrics({f"{prefix}/{k.split('/')[-1]}": v for k, v in row.items() if k.startswith("judge/")},
                            step)
    tracker.log_image("eval_accuracy_vs_guidance", plot, step)
    tracker.log_artifact(files, "evaluation")
    tracker.finish("FINISHED")
    return tracker.run_id


def log_benchmark(cfg: Config, uri: str, run_name: str, tags: dict[str, str], metrics: dict[str, float],
                  chart: np.ndarray, files: list[Path]) -> str:
    """Log one benchmark as its own run: the benchmarked config as params, the figures as metrics, the device and
    versions as tags, a throughput chart, and the table and JSON as artifacts."""
    tracker = MlflowTracker(resolve_tracking_uri(uri or cfg.tracking.uri), cfg.tracking.experiment, run_name)
    tracker.start(cfg, None, tags={"sd3ray.kind": "benchmark", **tags})
    tracker.log_metrics(metrics, 0)
    tracker.log_image("benchmark_images_per_s", chart, 0)
    for path in files:
        tracker.log_artifact(path, "benchmark")
    tracker.finish("FINISHED")
    return tracker.run_id
