"""Experiment tracking. `train()` logs through the Tracker protocol; only `MlflowTracker` imports mlflow, and only
rank 0 holds one (other ranks get a NullTracker).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sd3ray.config import Config, config_hash, flatten, to_yaml
from sd3ray.data.format import dataset_digest
from sd3ray.errors import Sd3rayError, TrackingError
from sd3ray.storage import is_uri, redact, resolve_tracking_uri
from sd3ray.tracking.outbox import IMAGE_WEIGHT, Outbox, Write, is_permanent
from sd3ray.tracking.protocol import NullTracker, Tracker
from sd3ray.tracking.system_metrics import SystemSampler

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput

# MLflow's INFO lines (creating database tables, validating the model's input example) and its artifact progress
# bars would land between the training lines; set before mlflow is first imported, and a user's own setting wins.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

UNDELIVERED_FILE = "undelivered.jsonl"  # in train.output_dir/mlflow-undelivered/RUN_ID/
PROGRESS_METRIC = "loss/train"  # its last logged step marks how far a resumed run had logged
# MLflow 3's UI opens an experiment by its kind; untagged ones it may take for GenAI (traces, prompts)
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# ...but MLflow 3.17's UI follows its GenAI / Model training switch (GenAI by default) whatever the tag says, and a
# link without this parameter lands on GenAI again even after a visit with it: every link sd3ray prints carries it
TRAINING_VIEW = "workflowType=machine_learning"
UI_PORT = 5000  # `mlflow ui`'s default
# `mlflow ui` and `mlflow server` on a database store also start MLflow's job runners (GenAI scorers, prompt
# optimisation, trace rollups): ~8 processes that each import MLflow, 2.3 GB and ~45 CPU s where the server alone
# is 0.5 GB and ~10 s (MLflow 3.17.2, one worker). sd3ray queues no such job, so the servers it starts go without
# them, as infra/mlflow/serve.sh does; a user's own setting wins.
WITHOUT_JOB_RUNNERS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
SYSTEM_PROGRESS_METRIC = "system/cpu_utilization_percentage"
# The config keys a run logs as params: the model's width, the timestep scheme, the learning rate and the guidance,
# what people compare first across runs (the runs table's columns and filters); the whole config is the run's
# config.yaml artifact, and its sd3ray.config_hash tag tells two configs apart. Few and short on purpose: MLflow's
# image card prints every param of a run (not its tags) above its picture, in a scroll area about as tall as the
# picture, so each line of them pushes ~6% of the sample grid out of view (docs/tracking.md); ~70 hid it whole.
COMPARED_PARAMS = ("model.width", "flow.scheme", "train.lr", "sample.guidance")


DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}  # each server's default, when a URI names none


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast with advice instead of letting the client retry for minutes against a dead server."""
    if uri.split("://", 1)[0].split("+", 1)[0].lower() in DATABASE_PORTS:
        check_database_answers(uri, timeout_s)
        return
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)
    except Exception as exc:
        raise TrackingError(f"MLflow tracking server {redact(uri)} is unreachable ({exc}). Start it (mlflow server "
                            f"--backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000) or unset "
                            f"MLFLOW_TRACKING_URI to log to ./mlflow.db") from exc


def check_database_answers(uri: str, timeout_s: float) -> None:
    """A database store (postgresql://, mysql://, mssql://) must accept a TCP connection at its host and port:
    without this, the run opens after the model is built and fails in the database driver with a traceback. Only the
    connection is tried (no driver is imported); a URI without a host (a local socket) or with several is left to
    MLflow."""
    import socket
    from urllib.parse import urlsplit

    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    try:
        parts = urlsplit(uri)
        host, port = parts.hostname, parts.port or DATABASE_PORTS[scheme]
    except ValueError:  # several hosts, or a port that is not a number
        return
    if not host:
        return
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__  # a timeout has no strerror
        raise TrackingError(f"MLflow tracking store {redact(uri)} is unreachable: nothing accepts connections at "
                            f"{host}:{port} ({reason}). Start the database or correct the host and port in the URI "
                            f"({scheme}'s default port is {DATABASE_PORTS[scheme]}), or log to a local file: "
                            f"--tracking-uri sqlite:///mlflow.db") from exc


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MlflowTracker:
    """One MLflow run per training run; a resumed run continues the same run without duplicating steps.

    Opening the run is synchronous (a server that is down at the start is a clear error). After that every write
    goes through an `Outbox`: training never waits on the server, and writes made while it is down are delivered,
    in order, when it is back. `finish` waits up to `tracking.flush_timeout_s` for the last ones; whatever the
    server never took is saved under `train.output_dir/mlflow-undelivered/RUN_ID/` and named on the console.
    """

    def __init__(self, uri: str, experiment: str, run_name: str = "", flush_timeout_s: float = 120.0,
                 max_pending: int = 20_000, retry_s: float = 5.0) -> None:
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.flush_timeout_s, self.max_pending, self.retry_s = flush_timeout_s, max_pending, retry_s
        self.run_id: str | None = None
        self._logged_through = -1  # metrics at or below this step were logged before a resume
        self._outbox: Outbox | None = None
        self._spool: Path | None = None  # undelivered writes and artifact copies wait here
        self._sampler: SystemSampler | None = None
        self._system_step = 0  # the next system-metrics step (a resumed run continues its series)
        self._params: set[str] = set()  # keys this run holds already: params cannot change once logged

    def start(self, cfg: Config, run_id: str | None = None, tags: dict[str, str] | None = None,
              run_name: str | None = None, parent_run_id: str | None = None) -> str | None:
        check_reachable(self.uri)
        from mlflow.tracking import MlflowClient

        limit_client_retries(self.uri)
        self.client = MlflowClient(self.uri)
        self.run_id = with_retries(lambda: self._open_run(cfg, run_id, tags, run_name, parent_run_id),
                                   f"opening an MLflow run at {redact(self.uri)}")
        self._spool = Path(cfg.train.output_dir).resolve() / "mlflow-undelivered" / self.run_id
        self._outbox = Outbox(f"MLflow at {redact(self.uri)}", self.max_pending, self.retry_s)
        if cfg.tracking.system_metrics_every_s > 0:
            self._sampler = SystemSampler(self._log_system, cfg.tracking.system_metrics_every_s,
                                          self._system_step).start()
        return self.run_id

    def _log_system(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now, run_id = int(time.time() * 1000), self.run_id
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if self._outbox is not None:
            self._outbox.put(Write(lambda: self.client.log_batch(run_id, metrics=batch), "system metrics",
                                   record={"system_step": step, "timestamp": now, "metrics": metrics}))

    def _open_run(self, cfg: Config, run_id: str | None, tags: dict[str, str] | None, run_name: str | None,
                  parent_run_id: str | None) -> str:
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, PROGRESS_METRIC)
            self._logged_through = max((m.step for m in history), default=-1)
            system = self.client.get_metric_history(run_id, SYSTEM_PROGRESS_METRIC)
            self._system_step = max((m.step for m in system), default=-1) + 1
            self._params = set(self.client.get_run(run_id).data.params)
            return run_id
        all_tags = {"sd3ray.config_hash": config_hash(cfg), "mlflow.source.git.commit": git_commit(),
                    **source_tags(), **(tags or {})}
        parent = parent_run_id if parent_run_id is not None else cfg.tracking.parent_run_id
        experiment_id = self._parent_experiment(parent) if parent else None
        if experiment_id is not None:
            all_tags["mlflow.parentRunId"] = parent
        else:
            experiment_id = self._experiment_id()
        name = run_name if run_name is not None else (self.run_name or cfg.tracking.run_name)
        run = self.client.create_run(experiment_id, run_name=name or None,
                                     tags={k: redact(str(v)) for k, v in all_tags.items()})
        from mlflow.entities import Param

        params = [Param(k, redact(str(v))) for k, v in compared_params(cfg).items()]
        self.client.log_batch(run.info.run_id, params=params)
        self._params = {param.key for param in params}
        self.client.log_text(run.info.run_id, redact(to_yaml(cfg)), "config.yaml")  # the whole config
        try:
            dataset = dataset_input(cfg.data.parquet_dir)
        except Sd3rayError:  # no set there yet (a sweep's parent run opens before its trials prepare it)
            dataset = None
        if dataset is not None:
            self.client.log_inputs(run.info.run_id, datasets=[dataset])
        return run.info.run_id

    def _experiment_id(self) -> str:
        """The configured experiment's id, created if new. Concurrent runs (a sweep's trials, parallel jobs) may
        race to create it: the loser takes the winner's."""
        from mlflow.exceptions import MlflowException

        if experiment := self.client.get_experiment_by_name(self.experiment):
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before sd3ray tagged its experiments
                self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
            return experiment.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=artifact_location(self.uri,
                                                 self.experiment), tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException:
            if experiment := self.client.get_experiment_by_name(self.experiment):
                return experiment.experiment_id
            raise

    def _parent_experiment(self, parent_run_id: str) -> str | None:
        """The parent's experiment, where a child run must live for the UI to nest it; None when the parent is not
        in this store (a checkpoint trained against another server): the run is then logged standalone."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(parent_run_id).info.experiment_id
        except MlflowException:
            return None

    def _put(self, write: Write) -> None:
        if self._outbox is None:
            raise RuntimeError("MlflowTracker: start() a run before logging to it")
        self._outbox.put(write)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self._logged_through:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # fixed now: a re-sent batch is the same rows, which MLflow keeps once
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        run_id = self.run_id
        self._put(Write(lambda: self.client.log_batch(run_id, metrics=batch), f"metrics of step {step}",
                        record={"step": step, "timestamp": now, "metrics": {m.key: m.value for m in batch}}))

    def log_params(self, params: dict[str, float | int | str]) -> None:
        """Params not logged yet (a resumed run has its first logging's); MLflow refuses to change a param."""
        # a float in 6 digits: the image card prints every param, and 17 digits of a reference statistic are noise
        fresh = {k: f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in params.items() if k not in self._params}
        if not fresh:
            return
        self._params.update(fresh)
        from mlflow.entities import Param

        run_id, batch = self.run_id, [Param(k, v) for k, v in fresh.items()]
        self._put(Write(lambda: self.client.log_batch(run_id, params=batch), f"params {', '.join(fresh)}",
                        record={"params": fresh}))

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        if step > self._logged_through:
            image, run_id = np.array(image, copy=True), self.run_id
            self._put(Write(lambda: self.client.log_image(run_id, image, key=key, step=step),
                            f"image {key} of step {step}", IMAGE_WEIGHT, record={"image": key, "step": step},
                            image=image))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder; a copy is taken now, since the caller may delete it before it goes out."""
        copy = spool_copy(Path(path), self._spool / "artifacts" / f"{time.time_ns()}")
        run_id, client = self.run_id, self.client

        def upload() -> None:
            if copy.is_dir():
                client.log_artifacts(run_id, str(copy), artifact_path)
            else:
                client.log_artifact(run_id, str(copy), artifact_path)
            shutil.rmtree(copy.parent, ignore_errors=True)

        self._put(Write(upload, f"artifact {Path(path).name}", record={"artifact": str(copy),
                                                                       "artifact_path": artifact_path}))

    def set_tags(self, tags: dict[str, str]) -> None:
        run_id, clean = self.run_id, {k: redact(str(v)) for k, v in tags.items()}

        def apply() -> None:
            for k, v in clean.items():
                self.client.set_tag(run_id, k, v)

        self._put(Write(apply, f"tags {', '.join(clean)}", record={"tags": clean}))

    def flush(self) -> None:
        if self._outbox is not None:
            self._outbox.flush(timeout_s=60.0)

    def log_model(self, cfg: Config, step: int, ema: dict, registered_model: str = "") -> None:
        weights = {k: v.detach().to("cpu", copy=True) for k, v in ema.items()}
        run_id, uri = self.run_id, self.uri

        def apply() -> None:
            from sd3ray.tracking.pyfunc import log_pyfunc_model

            info = log_pyfunc_model(uri, run_id, cfg, step, weights, registered_model)
            tags = {"sd3ray.model_uri": info.model_uri}
            if info.registered_model_version is not None:
                tags["sd3ray.registered_model"] = f"models:/{registered_model}/{info.registered_model_version}"
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)

        self._put(Write(apply, "the pyfunc model", IMAGE_WEIGHT, record={"model_of_step": step}))

    def _child_runs(self, child_run_name: str) -> list:
        experiment = self.client.get_run(self.run_id).info.experiment_id
        return self.client.search_runs([experiment], f"tags.mlflow.parentRunId = '{self.run_id}' and "
                                                     f"attributes.run_name = '{child_run_name}'")

    def register_child_model(self, child_run_name: str, registered_model: str) -> str | None:
        import mlflow

        runs = self._child_runs(child_run_name)
        model_uri = runs[0].data.tags.get("sd3ray.model_uri") if runs else None
        if not model_uri:
            return None
        mlflow.set_tracking_uri(self.uri)
        version = mlflow.register_model(model_uri, registered_model)
        return f"models:/{registered_model}/{version.version}"

    def close_child_run(self, child_run_name: str, status: str, tags: dict[str, str]) -> None:
        for run in self._child_runs(child_run_name):
            if run.info.status == "RUNNING":
                for key, value in tags.items():
                    self.client.set_tag(run.info.run_id, key, value)
                self.client.set_terminated(run.info.run_id, status)

    def latest_child_image(self, child_run_name: str, key: str) -> np.ndarray | None:
        import tempfile

        from PIL import Image

        runs = self._child_runs(child_run_name)
        if not runs:
            return None
        # MlflowClient.log_image's file names: KEY+step+STEP+timestamp+uuid.png, with KEY's "/" written as "~"
        prefix = f"images/{key.replace('/', '~')}+step+"
        images = [a.path for a in self.client.list_artifacts(runs[0].info.run_id, "images")
                  if a.path.startswith(prefix) and a.path.endswith(".png")]
        if not images:
            return None
        latest = max(images, key=lambda p: int(p[len(prefix):].split("+")[0]))
        with tempfile.TemporaryDirectory() as tmp:
            local = self.client.download_artifacts(runs[0].info.run_id, latest, tmp)
            return np.asarray(Image.open(local).convert("RGB"))

    def finish(self, status: str = "FINISHED") -> None:
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        if self._outbox is None:
            return
        run_id = self.run_id
        self._put(Write(lambda: self.client.set_terminated(run_id, status), f"run status {status}",
                        record={"status": status}))
        outbox, self._outbox = self._outbox, None
        undelivered = outbox.close(self.flush_timeout_s)
        if undelivered:
            saved = save_undelivered(undelivered, self._spool)
            print(f"sd3ray: warning: {redact(self.uri)} did not take {len(undelivered)} write(s) of run {run_id} "
                  f"within tracking.flush_timeout_s={self.flush_timeout_s:g}; they are saved in {saved}. Send them "
                  f"when the server is back: python jobs/replay_tracking.py {saved.parent} --tracking-uri "
                  f"{redact(self.uri)}", flush=True)
        elif self._spool is not None and self._spool.is_dir():
            shutil.rmtree(self._spool, ignore_errors=True)
            with contextlib.suppress(OSError):  # the folder of every run's leftovers goes when it holds none
                self._spool.parent.rmdir()


def compared_params(cfg: Config) -> dict[str, object]:
    """The params a run logs of its config: COMPARED_PARAMS's values."""
    values = flatten(cfg)
    return {key: values[key] for key in COMPARED_PARAMS}


def dataset_input(parquet_dir: str) -> DatasetInput:
    """The image set as the run's MLflow dataset input (name, digest, source, schema): the runs table's Dataset
    column and its filter then tell which data each run trained on."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import ColSpec, Schema

    location = parquet_dir if is_uri(parquet_dir) else str(Path(parquet_dir).resolve())
    name = Path(location.split("?", 1)[0].rstrip("/")).name or "images"
    with warnings.catch_warnings():  # a local folder matches MLflow's local source twice, and it says so
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(redact(location))
    schema = Schema([ColSpec("binary", "image"), ColSpec("integer", "label"), ColSpec("string", "caption")])
    dataset = MetaDataset(source, name=name, digest=dataset_digest(parquet_dir), schema=schema)
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])


def ui_url(base: str, experiment_id: str, run_id: str | None = None, tab: str = "") -> str:
    """The MLflow UI's page of an experiment (or one of its runs, on `tab`: model-metrics, artifacts, ...) in its
    training view."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "") + (f"/{tab}" if tab else "")
    return f"{base.rstrip('/')}/{page}?{TRAINING_VIEW}"


def review_hint(uri: str, run_id: str) -> str:
    """One console line: where the run is and how to open it, as a command and a link (the training view)."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(uri)
    try:
        experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    except Exception:  # the store is away: the run id still finds it later
        return f"sd3ray: MLflow run {run_id} at {redact(uri)}"
    if uri.startswith(("http://", "https://")):
        return f"sd3ray: review it at {ui_url(redact(uri), experiment_id, run_id)}"
    return (f"sd3ray: review it: mlflow ui --backend-store-uri {uri} --port {UI_PORT}, then open "
            f"{ui_url(f'http://127.0.0.1:{UI_PORT}', experiment_id, run_id)}")


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts. With a SQLite file, MLflow's default is `./mlruns` of whatever
    folder the process runs in, so one store's artifacts scatter over every folder a job was started from; here
    they go beside the database, in `mlartifacts/EXPERIMENT` (the folder `mlflow server` uses by default). A server
    or another database keeps its own default (None)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    folder = re.sub(r"[^\w.-]+", "_", experiment).strip("._") or "experiment"
    return (Path(uri[len(prefix):]).resolve().parent / "mlartifacts" / folder).as_uri()


def source_tags(argv0: str | None = None) -> dict[str, str]:
    """MLflow's Source and User columns: the job that made the run (a script under jobs/, or the program),
    whether a Ray job submitted it, and who ran it."""
    import getpass
    import sys

    script = Path(argv0 if argv0 is not None else sys.argv[0])
    name = f"{script.parent.name}/{script.name}" if script.parent.name == "jobs" else script.name
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {"mlflow.source.name": name or "python", "mlflow.user": user,
            # Ray's job supervisor sets this variable for the driver of a submitted job
            "mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else "LOCAL"}


def limit_client_retries(uri: str) -> None:
    """MLflow's client retries a failed request 7 times with exponential backoff (minutes). The outbox retries on
    its own, so each request here gives up sooner; a user's own settings win."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def with_retries(action, what: str, attempts: int = 6, first_wait_s: float = 1.0):
    """Run `action`, retrying transient failures (a busy SQLite file, a server blip) with doubling waits; a
    rejection or the last failure becomes a TrackingError."""
    wait = first_wait_s
    for attempt in range(attempts):
        try:
            return action()
        except Exception as exc:
            if is_permanent(exc) or attempt == attempts - 1:
                raise TrackingError(f"{what} failed: {redact(str(exc).splitlines()[0] if str(exc) else repr(exc))}. "
                                    f"Check the server and its credentials (MLFLOW_TRACKING_USERNAME/PASSWORD), "
                                    f"or pass --no-tracking") from exc
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def spool_copy(source: Path, folder: Path) -> Path:
    """`source` (file or folder) copied into `folder`: hard links where the filesystem allows (no bytes copied)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_dir():
        shutil.copytree(source, target, copy_function=link_or_copy)
    else:
        link_or_copy(str(source), str(target))
    return target


def save_undelivered(writes: list[Write], folder: Path) -> Path:
    """Write what the server never took to folder/undelivered.jsonl (one JSON record per write, in order; an image's
    pixels go beside it as .npy), for `jobs/replay_tracking.py` to send later."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / UNDELIVERED_FILE
    with open(path, "a") as f:
        for write in writes:
            record = dict(write.record or {"what": write.what})
            if write.image is not None:
                image_file = folder / f"image-{time.time_ns()}.npy"
                np.save(image_file, np.asarray(write.image), allow_pickle=False)
                record["image_file"] = image_file.name
            f.write(json.dumps(record) + "\n")
    return path


def make_tracker(cfg: Config, enabled: bool = True, uri: str | None = None) -> Tracker:
    """The MLflow tracker at `uri` (default: the config's, then $MLFLOW_TRACKING_URI, then ./mlflow.db)."""
    if not enabled:
        return NullTracker()
    return MlflowTracker(resolve_tracking_uri(uri or cfg.tracking.uri), cfg.tracking.experiment,
                         cfg.tracking.run_name, cfg.tracking.flush_timeout_s)
