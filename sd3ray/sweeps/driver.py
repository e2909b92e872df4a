"""The sweep's driver side: connect, open the parent MLflow run, fit or resume the Tuner, write the summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sd3ray.config import ConfigError
from sd3ray.sweeps.report import to_markdown, write_summary
from sd3ray.sweeps.spec import SweepSpec, base_config
from sd3ray.sweeps.tuner import build_tuner, run_trial, trial_resources
from sd3ray.tracking.mlflow_tracker import make_tracker


def run_sweep(spec: SweepSpec, resume: bool = False, tracking: bool = True) -> list[dict[str, Any]]:
    from ray import tune

    from sd3ray.cluster.connect import connect
    from sd3ray.data.prepare import prepare_dataset

    base = base_config(spec)
    prepare_dataset(base)  # once, here: every trial's workers only read it
    storage = Path(spec.storage_path).resolve() / spec.name
    meta_path = storage.parent / f"{spec.name}.sd3ray.json"
    connect()
    tracker = make_tracker(base, enabled=tracking)
    if resume and not tune.Tuner.can_restore(str(storage)):
        raise ConfigError(f"--resume: no sweep to continue at {storage}; run without --resume first")
    parent = json.loads(meta_path.read_text())["parent_run_id"] if resume and meta_path.is_file() else None
    parent = tracker.start(base, parent, tags={"sd3ray.sweep": spec.name}, run_name=f"sweep-{spec.name}") or ""
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps({"parent_run_id": parent}))
    try:
        if resume:
            # finished trials keep their results; unfinished ones continue; failed ones stay failed
            tuner = tune.Tuner.restore(str(storage), trainable=tune.with_resources(run_trial, trial_resources()),
                                       resume_unfinished=True, resume_errored=False, restart_errored=False)
        else:
            tuner = build_tuner(spec, storage, parent, tracking)
        results = tuner.fit()
        rows = write_summary(tracker, results, spec)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    print(to_markdown(rows))
    return rows
