"""The sweep's driver side: connect, open the parent MLflow run, fit or resume the Tuner, write the summary; a sweep
whose trials all failed ends in an error."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from sd3ray.config import Config, ConfigError, resolve_shipped
from sd3ray.storage import check_shared, is_file, open_folder, redact, resolve_tracking_uri
from sd3ray.sweeps.report import all_failed, check_some_trial_ran, summary_text, write_summary
from sd3ray.sweeps.spec import SweepSpec, base_config, sweep_root, sweep_storage
from sd3ray.sweeps.tuner import build_tuner, run_trial, trial_resources
from sd3ray.tracking.mlflow_tracker import make_tracker


def run_sweep(spec: SweepSpec, resume: bool = False, tracking: bool = True) -> list[dict[str, Any]]:
    from ray import tune

    from sd3ray.cluster.connect import connect
    from sd3ray.data.prepare import prepare_dataset

    spec = pinned_paths(spec)
    base = base_config(spec)
    prepare_dataset(base)  # once, here: every trial's workers only read it
    prepare_judge(base)
    storage = sweep_storage(spec)
    connect()
    check_sweep_storage(spec, base, tracking)
    tracker = make_tracker(base, enabled=tracking)
    if resume and not tune.Tuner.can_restore(storage):
        raise ConfigError(f"--resume: no sweep to continue at {redact(storage)}; run without --resume first")
    if not resume and tune.Tuner.can_restore(storage):
        # a second sweep in the same folder would mix its trials with the first's in one table and one parent run
        raise ConfigError(f"sweep '{spec.name}' already ran at {redact(storage)}: continue it with --resume (its "
                          f"finished trials keep their results), or give this one another name (--set name=NEW)")
    parent = read_parent_run(spec) if resume else None
    parent = tracker.start(base, parent, tags={"sd3ray.sweep": spec.name}, run_name=f"sweep-{spec.name}") or ""
    write_parent_run(spec, parent)
    try:
        if resume:
            # finished trials keep their results; unfinished ones continue; failed ones stay failed
            tuner = tune.Tuner.restore(storage, trainable=tune.with_resources(run_trial, trial_resources()),
                                       resume_unfinished=True, resume_errored=False, restart_errored=False)
        else:
            tuner = build_tuner(spec, parent, tracking)
        results = tuner.fit()
        rows = write_summary(tracker, results, spec)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FAILED" if all_failed(rows) else "FINISHED")
    print(summary_text(rows), flush=True)
    check_some_trial_ran(rows, spec, storage)
    return rows


# the config's paths that name a local file or folder, which a trial would read relative to its own folder
PINNED_KEYS = ("data.parquet_dir", "data.raw_root", "train.output_dir", "model.init_from", "vae.source",
               "text.encoder", "sample.guide")


def _value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    return list(value) if isinstance(value, tuple) else value


def pinned_paths(spec: SweepSpec) -> SweepSpec:
    """The sweep with its relative paths made absolute where the command was typed. Tune runs each trial function
    in a folder of its own, so the defaults `data/mnist_parquet`, `runs` and `./mlflow.db` would name folders inside
    that one: a trial would find no data, or log to a database nobody opens. The base config's path, its data,
    output and pretrained folders, and a SQLite tracking store are appended to every trial's overrides as absolute
    paths (a dimension of the space still overrides them); URIs, hub ids and servers stay as they are."""
    from sd3ray.cluster.trainer import absolute_paths

    base = base_config(spec)
    fixed = absolute_paths(base)
    pins = [f"{key}={json.dumps(_value(fixed, key))}" for key in PINNED_KEYS if _value(fixed, key) != _value(base, key)]
    uri = resolve_tracking_uri(base.tracking.uri)
    if uri.startswith("sqlite:///") and uri != base.tracking.uri:  # a file: no password to copy into every trial
        pins.append(f"tracking.uri={json.dumps(uri)}")
    return replace(spec, base_config=str(resolve_shipped(spec.base_config).resolve()),
                   overrides=(*spec.overrides, *pins))


def prepare_judge(base: Any) -> None:
    """Find or train the judge here, once, before any trial: trials that start together would each train it (a few
    minutes of CPU apiece) on a set without a shipped judge. Its cache (`SD3RAY_CACHE`) is on this node: trials
    on other nodes find it only where that folder is shared."""
    from sd3ray.data.bucketed_sets import is_bucketed
    from sd3ray.data.format import read_metadata, read_split
    from sd3ray.evaluation.judge import is_digit_data, load_judge
    from sd3ray.model.vae import uses_vae

    if base.eval.num_samples == 0 or uses_vae(base.vae):
        return
    meta = read_metadata(base.data.parquet_dir)
    if is_bucketed(meta) or (meta["channels"], meta["image_size"]) != (1, 32):  # what the judge reads, as training
        return
    train = read_split(base.data.parquet_dir, "train")
    if is_digit_data(train):
        load_judge(train)


def check_sweep_storage(spec: SweepSpec, base: Any, tracking: bool) -> None:
    """What training checks before it starts, for the sweep: on several nodes, the storage, the data and the
    tracking store must be where every node sees them; the storage must open; the tracking server must answer."""
    import ray

    from sd3ray.cluster.trainer import check_storage
    from sd3ray.tracking.mlflow_tracker import check_reachable

    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    locations = {"storage_path": sweep_root(spec), "data.parquet_dir": base.data.parquet_dir}
    if tracking:
        locations["tracking.uri"] = resolve_tracking_uri(base.tracking.uri)
        check_reachable(locations["tracking.uri"])
    check_shared(locations, nodes)
    check_storage(sweep_root(spec))


def _parent_file(spec: SweepSpec) -> tuple[Any, str]:
    """Beside the sweep's folder: `NAME.sd3ray.json`, which keeps the parent MLflow run for --resume."""
    fs, root = open_folder(sweep_root(spec))
    return fs, f"{root}/{spec.name}.sd3ray.json"


def read_parent_run(spec: SweepSpec) -> str | None:
    fs, path = _parent_file(spec)
    if not is_file(fs, path):
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())["parent_run_id"]


def write_parent_run(spec: SweepSpec, parent: str) -> None:
    fs, path = _parent_file(spec)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps({"parent_run_id": parent}).encode())
