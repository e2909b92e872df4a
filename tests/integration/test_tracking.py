"""Training against a real MLflow server over HTTP, then reading back what a person would look at."""

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from sd3ray.checkpoint import latest_checkpoint
from sd3ray.tracking.mlflow_tracker import MlflowTracker
from sd3ray.training.context import LocalContext
from sd3ray.training.loop import train


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_training_run_round_trips_through_a_real_server(mlflow_server: str, micro_config, tmp_path: Path) -> None:
    common = ["train.steps=4", "train.log_every=2", "train.eval_every=2", "train.ckpt_every=2",
              f"tracking.uri={mlflow_server}", "tracking.experiment=test-roundtrip", "tracking.run_name=micro",
              "tracking.system_metrics_every_s=0.2"]
    cfg = micro_config(*common)
    tracker = MlflowTracker(mlflow_server, "test-roundtrip", "micro")
    result = train(cfg, LocalContext(tmp_path / "run", torch.device("cpu")), tracker)

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "micro"
    assert run.data.params["model.width"] == "32" and run.data.params["flow.scheme"] == "logit_normal"
    assert len(run.data.tags["sd3ray.config_hash"]) == 12 and "sd3ray.checkpoint_uri" in run.data.tags
    assert [m.step for m in client.get_metric_history(result.run_id, "loss/train")] == [2, 4]
    # what the MLflow UI shows: a model-training experiment, the source and user, system metrics
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.user"]
    assert run.data.tags["mlflow.source.name"]
    cpu = [m.step for m in client.get_metric_history(result.run_id, "system/cpu_utilization_percentage")]
    assert cpu and cpu == list(range(len(cpu))), cpu
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    assert {"loss/val", "val/loss_t0.062", "train/lr", "train/grad_norm", "train/images_per_s"} <= set(run.data.metrics)
    files = _artifacts(client, result.run_id)
    assert "config.yaml" in files and "checkpoint/model.pt" in files and "checkpoint/MANIFEST.json" in files
    grids = [f for f in files if f.startswith("images/") and f.endswith(".png")]
    # the untrained model's grid at step 0 (MLflow's image card opens there), then one per evaluation
    assert sorted(int(f.split("+")[2]) for f in grids if f.startswith("images/samples~grid+step+")) == [0, 2, 4], grids

    # Resume from the step-2 checkpoint: the same MLflow run continues, with no duplicated steps.
    first = sorted((tmp_path / "run/checkpoints").iterdir())[0]
    assert first.name == "step_00000002"
    resumed = train(micro_config(*common, "train.steps=6"), LocalContext(tmp_path / "run", torch.device("cpu"), first),
                    MlflowTracker(mlflow_server, "test-roundtrip"))
    assert resumed.run_id == result.run_id
    assert [m.step for m in client.get_metric_history(result.run_id, "loss/train")] == [2, 4, 6]
    resumed_cpu = [m.step for m in client.get_metric_history(result.run_id, "system/cpu_utilization_percentage")]
    assert resumed_cpu[:len(cpu)] == cpu and resumed_cpu == sorted(set(resumed_cpu))  # the series goes on
    assert latest_checkpoint(tmp_path / "run/checkpoints").name == "step_00000006"
    grids = [f for f in _artifacts(client, result.run_id) if f.startswith("images/samples~grid+step+")
             and f.endswith(".png")]
    assert sorted(int(f.split("+")[2]) for f in grids) == [0, 2, 4, 6], grids  # a resumed run adds no step-0 grid


@pytest.fixture(scope="module")
def _server_of_this_module(tmp_path_factory: pytest.TempPathFactory):
    """One real MLflow server for the outage tests, which stop it and start it again on the same port and store:
    started once for them all, its start-up (~10 s) paid once."""
    from tests.support import free_port, start_mlflow_server, stop_process_group

    root, port = tmp_path_factory.mktemp("restartable-server"), free_port()
    server = {"proc": start_mlflow_server(root, port)}

    def stop() -> None:
        stop_process_group(server["proc"])

    def start() -> None:
        server["proc"] = start_mlflow_server(root, port)

    try:
        yield f"http://127.0.0.1:{port}", stop, start, server
    finally:
        stop()


@pytest.fixture
def restartable_server(_server_of_this_module):
    """The module's server, up when the test starts (a failed test may have left it stopped); (uri, stop, start)."""
    uri, stop, start, server = _server_of_this_module
    if server["proc"].poll() is not None:
        start()
    return uri, stop, start


def test_writes_made_while_the_server_is_down_arrive_after_it_restarts(restartable_server, micro_config) -> None:
    import time

    uri, stop, start = restartable_server
    tracker = MlflowTracker(uri, "outage", "outage", retry_s=0.5)
    run_id = tracker.start(micro_config())
    for step in range(1, 6):
        tracker.log_metrics({"loss/train": 1.0 / step}, step)
    stop()
    began = time.monotonic()
    for step in range(6, 16):
        tracker.log_metrics({"loss/train": 1.0 / step}, step)
    tracker.log_image("samples", np.zeros((8, 8, 3), dtype=np.uint8), 15)
    tracker.set_tags({"sd3ray.note": "written while the server was down"})
    assert time.monotonic() - began < 10, "logging waited on a stopped server"
    start()
    tracker.finish()

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "loss/train")
    assert [m.step for m in history] == list(range(1, 16))  # every step once, none lost
    assert run.info.status == "FINISHED" and run.data.tags["sd3ray.note"] == "written while the server was down"
    assert any(path.startswith("images/samples+step+15+") for path in _artifacts(client, run_id, "images"))


def test_writes_the_server_never_took_are_replayed_later_exactly_once(restartable_server, micro_config, tmp_path,
                                                                     capsys) -> None:
    import subprocess
    import sys

    from tests.support import REPO_ROOT

    uri, stop, start = restartable_server
    cfg = micro_config()
    tracker = MlflowTracker(uri, "replay", "replay", flush_timeout_s=1.0, retry_s=0.2)
    run_id = tracker.start(cfg)
    tracker.log_metrics({"loss/train": 1.0}, 1)
    tracker.flush()
    stop()  # and it never comes back while the run lasts
    for step in range(2, 6):
        tracker.log_metrics({"loss/train": 1.0 / step}, step)
    tracker.log_image("samples", np.full((8, 8, 3), 7, dtype=np.uint8), 5)
    tracker.set_tags({"sd3ray.note": "sent later"})
    (tmp_path / "report.md").write_text("# report\n")
    tracker.log_artifact(tmp_path / "report.md")
    tracker.finish()
    folder = Path(cfg.train.output_dir).resolve() / "mlflow-undelivered" / run_id
    replay = [sys.executable, "jobs/replay_tracking.py", str(folder), "--tracking-uri", uri]
    assert f"python jobs/replay_tracking.py {folder} --tracking-uri {uri}" in capsys.readouterr().out  # the warning

    down = subprocess.run(replay, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert down.returncode == 1 and "unreachable" in down.stderr and "Traceback" not in down.stderr
    start()
    sent = subprocess.run(replay, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert sent.returncode == 0 and f"run {run_id}" in sent.stdout and "sent" in sent.stdout, sent.stderr
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert [m.step for m in client.get_metric_history(run_id, "loss/train")] == [1, 2, 3, 4, 5]
    assert run.info.status == "FINISHED" and run.data.tags["sd3ray.note"] == "sent later"
    files = _artifacts(client, run_id)
    assert "report.md" in files and any(f.startswith("images/samples+step+5+") for f in files), files

    again = subprocess.run(replay, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing left to send" in again.stdout, again.stderr
    assert len(client.get_metric_history(run_id, "loss/train")) == 5  # nothing twice


def test_a_training_run_outlives_a_server_restart(restartable_server, mnist_parquet: Path, tmp_path: Path) -> None:
    """jobs/train.py keeps training while the server is down; every logged step reaches the server."""
    import os
    import subprocess
    import sys
    import time

    from tests.support import MICRO, REPO_ROOT

    uri, stop, start = restartable_server
    steps, log_every = 200, 10
    command = [sys.executable, "jobs/train.py", "--local", "--device", "cpu", "--config", "configs/mnist_tiny.yaml",
               "--name", "outage", "--steps", str(steps),
               *[arg for item in [*MICRO, f"data.parquet_dir={mnist_parquet}", f"train.output_dir={tmp_path / 'runs'}",
                                  f"train.log_every={log_every}", "train.eval_every=100", "train.ckpt_every=100",
                                  "tracking.experiment=training-outage", "tracking.flush_timeout_s=300"]
                 for arg in ("--set", item)]]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        client = MlflowClient(uri)
        deadline = time.monotonic() + 300
        while not ((experiment := client.get_experiment_by_name("training-outage"))
                   and client.search_runs([experiment.experiment_id], "metrics.`loss/train` > 0")):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        stop()
        stopped_at = log.read_text().count("\nstep ")
        time.sleep(2)  # the run goes on without its server (stop() itself took seconds of it)
        start()
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert "is unreachable" in output and output.count("\nstep ") > stopped_at, output[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("training-outage").experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss/train")
    assert [m.step for m in history] == list(range(log_every, steps + 1, log_every)), output[-3000:]
    assert run.info.status == "FINISHED"
