"""What the loop logs through: the `Tracker` protocol, and `NullTracker` for ranks other than 0 and for runs with
tracking off. Only `sd3ray.tracking.mlflow_tracker` imports mlflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from sd3ray.config import Config

# MLflow's UI shows a run's metrics in sections by the key's prefix, alphabetically, and a section only for a prefix
# some metric has (an image joins its prefix's section). `samples/` holds the grids; this metric, logged at every
# evaluation, gives them their section even when no judge scores the samples.
EVAL_SECONDS = "samples/seconds"  # what sampling (and judging) took at an eval step


class Tracker(Protocol):
    """Everything sd3ray records, and the one thing it reads back. A backend implements these and nothing else:
    the loop, sweeps, evaluation and benchmarks use no other method and never look at the backend's client."""

    run_id: str | None

    def start(self, cfg: Config, run_id: str | None = None, tags: dict[str, str] | None = None,
              run_name: str | None = None, parent_run_id: str | None = None) -> str | None:
        """Open a new run (config values as params), or continue `run_id`. `run_name` and `parent_run_id` default
        to `cfg.tracking`'s; a child run lives beside its parent. Returns the run id (None if nothing records)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_params(self, params: dict[str, float | int | str]) -> None:
        """Values that stay the same for the whole run (the global batch), logged once as params beside the
        config's rather than as flat charts; logging a value again is a no-op."""

    def log_image(self, key: str, image: np.ndarray, step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_model(self, cfg: Config, step: int, ema: dict, registered_model: str = "") -> None:
        """The EMA weights as the run's MLflow pyfunc model, registered under `registered_model` when given."""

    def flush(self) -> None:
        """Deliver what was logged so far before a checkpoint is reported, so that a run resumed from it (after
        its process died) misses no step; returns at once while the store is down."""

    def latest_child_image(self, child_run_name: str, key: str) -> np.ndarray | None:
        """The newest image `key` of this run's child run named so, if any (a sweep shows its best trials')."""

    def register_child_model(self, child_run_name: str, registered_model: str) -> str | None:
        """Register the model that this run's child run named so logged (a sweep's best trial); its
        `models:/NAME/VERSION`, or None when it logged none."""

    def close_child_run(self, child_run_name: str, status: str, tags: dict[str, str]) -> None:
        """End this run's child run named so with `status` and `tags`, if it is still running: a trial that Tune
        stopped (ASHA), or whose workers died, never ended its own run."""

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Logs nothing: for non-zero ranks and for runs without tracking."""

    def __init__(self) -> None:
        self.run_id: str | None = None

    def start(self, cfg: Config, run_id: str | None = None, tags: dict[str, str] | None = None,
              run_name: str | None = None, parent_run_id: str | None = None) -> str | None:
        self.run_id = run_id
        return run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_params(self, params: dict[str, float | int | str]) -> None: ...
    def log_image(self, key: str, image: np.ndarray, step: int) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_model(self, cfg: Config, step: int, ema: dict, registered_model: str = "") -> None: ...
    def flush(self) -> None: ...

    def latest_child_image(self, child_run_name: str, key: str) -> np.ndarray | None:
        return None

    def register_child_model(self, child_run_name: str, registered_model: str) -> str | None:
        return None

    def close_child_run(self, child_run_name: str, status: str, tags: dict[str, str]) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...
